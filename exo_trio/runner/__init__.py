"""The runner process side: everything that runs in `python -m exo_trio.runner`.

A runner is a separate OS process per shard; the node's Worker (exo_trio/worker.py)
starts it and speaks to it only through the framed protocol (protocol.py, framing.py)
on its pipes. Nothing here is imported by the node but those two modules, so MLX is
never loaded into the node process.

    __main__.py     the command line: a whole model (loop.py) or one rank (rank.py)
    loop.py         protocol I/O and the main loop of a runner holding a whole model
    rank.py         one rank of a model split across an mx.distributed group
    step_sync.py    every rank applies the same commands at every step
    layer_split.py  cutting an mlx-lm model into pipeline or tensor parts
    engine.py       continuous batching on mlx-lm's BatchGenerator
    start_policy.py when to start waiting requests, and which share a prefill pass
    prefill.py      prefilling several prompts in one padded pass, first tokens included
    prefix_cache.py the KV state of finished requests, reused by later prompts
    solo.py         a request alone on the runner, decoded like generate_step
    stop_strings.py text-level stop sequences
    protocol.py     worker <-> runner messages
    framing.py      length-prefixed msgpack frames
"""
