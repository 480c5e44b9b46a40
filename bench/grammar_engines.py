"""The grammar engines compared: compile time and per-token cost of a JSON schema.

    python -m bench.grammar_engines TOKENIZER_DIR [TOKENS]

For llguidance (the engine exo-trio uses), xgrammar and outlines-core, whichever
are installed (the latter two are not dependencies: install them into a scratch
venv to compare; xgrammar pulls in torch). Each compiles one schema and walks
TOKENS tokens at random through the allowed set (a fresh matcher whenever one
completes); the per-token cost is the mask computation plus advancing the
matcher. docs/api.md ("Structured output") has the figures and the decision.
"""

import importlib.util
import json
import random
import statistics
import sys
import time

import numpy as np

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "tags", "address", "active"],
    "additionalProperties": False,
}

TOKENS = int(sys.argv[2]) if len(sys.argv) > 2 else 400


def unpack(bitmask_words: np.ndarray, vocab: int) -> np.ndarray:
    bits = np.unpackbits(bitmask_words.view(np.uint8), bitorder="little")[:vocab]
    return np.flatnonzero(bits)


def walk(name, new_matcher, allowed, consume, finished, vocab, rng):
    """Random constrained walk; times allowed() (the mask) and consume()."""
    mask_t, cons_t = [], []
    m = new_matcher()
    n = 0
    while n < TOKENS:
        t0 = time.perf_counter()
        ids = allowed(m)
        t1 = time.perf_counter()
        if ids.dtype == np.int32 and len(ids) == (vocab + 31) // 32:
            ids = unpack(ids, vocab)
        if len(ids) == 0:
            print(name, "empty mask")
            return None
        tok = int(ids[rng.randrange(len(ids))])
        t2 = time.perf_counter()
        consume(m, tok)
        t3 = time.perf_counter()
        mask_t.append(t1 - t0)
        cons_t.append(t3 - t2)
        n += 1
        if finished(m):
            m = new_matcher()
    return mask_t, cons_t


def report(name, compile_s, res):
    mask_t, cons_t = res
    per = [a + b for a, b in zip(mask_t, cons_t, strict=True)]
    mean, p50 = statistics.mean(per) * 1e6, statistics.median(per) * 1e6
    p99 = sorted(per)[int(len(per) * 0.99)] * 1e6
    mask, consume = statistics.mean(mask_t) * 1e6, statistics.mean(cons_t) * 1e6
    print(
        f"{name:14s} compile {compile_s * 1e3:8.2f} ms   per token: mean {mean:8.1f} us"
        f"  p50 {p50:8.1f} us  p99 {p99:8.1f} us  (mask {mask:.1f}, consume {consume:.1f})"
    )


def main():
    from transformers import AutoTokenizer

    path = sys.argv[1]
    hf = AutoTokenizer.from_pretrained(path)
    vocab = len(hf)
    eos = hf.eos_token_id
    print(f"tokenizer {path}: vocab {vocab}, eos {eos}, {TOKENS} tokens")

    # llguidance
    import llguidance
    import llguidance.hf
    import llguidance.numpy as lln

    t = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(hf, n_vocab=vocab)
    print(f"llguidance tokenizer setup {time.perf_counter() - t:.3f} s")
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA)
    t = time.perf_counter()
    m0 = llguidance.LLMatcher(lltok, grammar)
    assert not m0.is_error(), m0.get_error()
    comp = time.perf_counter() - t
    bm = lln.allocate_token_bitmask(1, vocab)

    def ll_allowed(m):
        lln.fill_next_token_bitmask(m, bm, 0)
        return bm[0]

    res = walk(
        "llguidance",
        lambda: llguidance.LLMatcher(lltok, grammar),
        ll_allowed,
        lambda m, t: m.consume_token(t),
        lambda m: m.is_stopped() or m.is_error(),
        vocab,
        random.Random(0),
    )
    report("llguidance", comp, res)

    # batch of 8 via LLExecutor (parallel fill)
    ex = llguidance.LLExecutor()
    ms = [llguidance.LLMatcher(lltok, grammar) for _ in range(8)]
    bm8 = lln.allocate_token_bitmask(8, vocab)
    rng = random.Random(1)
    times = []
    for _ in range(TOKENS // 4):
        t0 = time.perf_counter()
        lln.fill_next_token_bitmask_par(ex, [(m, i) for i, m in enumerate(ms)], bm8)
        toks = []
        for i in range(8):
            ids = unpack(bm8[i], vocab)
            toks.append(int(ids[rng.randrange(len(ids))]))
        for i, m in enumerate(ms):
            m.consume_token(toks[i])
            if m.is_stopped():
                ms[i] = llguidance.LLMatcher(lltok, grammar)
        times.append(time.perf_counter() - t0)
    print(
        f"llguidance x8 parallel fill+consume: mean {statistics.mean(times) * 1e6:.1f} us per step"
    )

    # outlines-core
    if importlib.util.find_spec("outlines_core") is None:
        print("outlines-core not installed")
    try:
        from outlines_core import Guide, Index, Vocabulary
        from outlines_core.json_schema import build_regex_from_schema

        t = time.perf_counter()
        # Vocabulary: token string (decoded bytes as str) -> ids, eos excluded.
        vocab_map: dict[str, list[int]] = {}
        for tok_str, tid in hf.get_vocab().items():
            if tid == eos:
                continue
            s = hf.convert_tokens_to_string([tok_str])
            vocab_map.setdefault(s, []).append(tid)
        ovocab = Vocabulary(eos, vocab_map)
        setup = time.perf_counter() - t
        t = time.perf_counter()
        regex = build_regex_from_schema(json.dumps(SCHEMA))
        index = Index(regex, ovocab)
        comp = time.perf_counter() - t
        print(f"outlines-core vocabulary setup {setup:.3f} s")
        obm = np.zeros((vocab + 31) // 32, dtype=np.int32)
        res = walk(
            "outlines-core",
            lambda: Guide(index),
            lambda g: (g.write_mask_into(obm.ctypes.data, obm.size, 4), obm)[1],
            lambda g, t: g.advance(t),
            lambda g: g.is_finished(),
            vocab,
            random.Random(0),
        )
        report("outlines-core", comp, res)
    except Exception as exc:
        print("outlines-core:", repr(exc))

    # xgrammar
    try:
        t = time.perf_counter()
        import xgrammar as xgr

        imp = time.perf_counter() - t
        t = time.perf_counter()
        info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab)
        compiler = xgr.GrammarCompiler(info)
        setup = time.perf_counter() - t
        t = time.perf_counter()
        compiled = compiler.compile_json_schema(json.dumps(SCHEMA))
        comp = time.perf_counter() - t
        torch = "torch" in sys.modules
        print(f"xgrammar import {imp:.2f} s (torch loaded: {torch}), setup {setup:.3f} s")
        xbm = xgr.allocate_token_bitmask(1, vocab)

        def x_allowed(m):
            m.fill_next_token_bitmask(xbm, 0)
            return xbm[0].numpy()

        res = walk(
            "xgrammar",
            lambda: xgr.GrammarMatcher(compiled),
            x_allowed,
            lambda m, t: m.accept_token(t),
            lambda m: m.is_terminated(),
            vocab,
            random.Random(0),
        )
        report("xgrammar", comp, res)
        xms = [xgr.GrammarMatcher(compiled) for _ in range(8)]
        bmx = xgr.allocate_token_bitmask(8, vocab)
        batch = xgr.BatchGrammarMatcher()
        rng = random.Random(1)
        times = []
        for _ in range(TOKENS // 4):
            t0 = time.perf_counter()
            batch.batch_fill_next_token_bitmask(xms, bmx)
            toks = []
            for i in range(8):
                ids = unpack(bmx[i].numpy(), vocab)
                toks.append(int(ids[rng.randrange(len(ids))]))
            for i, m in enumerate(xms):
                m.accept_token(toks[i])
                if m.is_terminated():
                    xms[i] = xgr.GrammarMatcher(compiled)
            times.append(time.perf_counter() - t0)
        print(f"xgrammar x8 batch fill+accept: mean {statistics.mean(times) * 1e6:.1f} us per step")
    except Exception as exc:
        print("xgrammar:", repr(exc))


if __name__ == "__main__":
    main()
