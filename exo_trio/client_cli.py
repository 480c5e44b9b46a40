"""The client commands: `exo-trio pull | ls | ps | run | rm`, talking to a running
node (any node of a cluster) at `--host` or $EXO_TRIO_HOST (default
127.0.0.1:52415), with $EXO_TRIO_API_KEY if the node wants a key.

They use the node's Ollama-compatible endpoints where Ollama has one (/api/pull,
/api/tags, /api/delete, /api/show, /api/chat), and /state for `ps`, so `run`
behaves as `ollama run` does: a model that is not in the store is pulled first,
then loaded, then the chat starts.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

from exo_trio.client import ClientError, NodeClient
from exo_trio.terminal import ProgressBar, human_bytes

COMMANDS = ("pull", "ls", "ps", "run", "rm")
MULTILINE = '"""'
HELP = """Available commands:
  /clear   forget the conversation so far
  /bye     leave (or Ctrl-D)
  /?       this help
Start and end a message with \"\"\" to write several lines.
Ctrl-C stops the answer being written; Ctrl-D leaves."""


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    host = argparse.ArgumentParser(add_help=False)
    host.add_argument(
        "--host",
        help="the node to talk to: HOST[:PORT] or a URL (default: $EXO_TRIO_HOST "
        "or 127.0.0.1:52415)",
    )
    pull = sub.add_parser("pull", parents=[host], help="download a hub model into the store")
    pull.add_argument("model", help="org/name or org/name@revision")
    sub.add_parser("ls", parents=[host], help="list the models in the node's store")
    sub.add_parser("ps", parents=[host], help="list the models running in the cluster")
    run = sub.add_parser("run", parents=[host], help="chat with a model (pulls and loads it)")
    run.add_argument("model")
    run.add_argument("prompt", nargs="*", help="answer this one prompt and exit")
    run.add_argument("--max-tokens", type=int, help="the longest answer, in tokens")
    rm = sub.add_parser("rm", parents=[host], help="delete a model from the node's store")
    rm.add_argument("model")


def main(args: argparse.Namespace) -> int:
    try:
        client = NodeClient.for_host(args.host)
        if args.command == "pull":
            pull(client, args.model)
        elif args.command == "ls":
            print_table(list_store(client))
        elif args.command == "ps":
            print_table(list_running(client))
        elif args.command == "run":
            run(client, args.model, " ".join(args.prompt), args.max_tokens)
        elif args.command == "rm":
            client.call("DELETE", "/api/delete", {"model": args.model})
            print(f"deleted '{args.model}'")
    except ClientError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


# ---- pull ----


def pull(client: NodeClient, model: str, stream: TextIO | None = None) -> None:
    """POST /api/pull and draw its progress: one bar over every file."""
    out = stream or sys.stderr
    files: dict[str, tuple[int, int]] = {}
    bar = ProgressBar(f"pulling {model}", out)
    try:
        for item in client.lines("/api/pull", {"model": model, "stream": True}):
            if "total" in item:
                files[str(item.get("digest"))] = (int(item.get("completed", 0)), int(item["total"]))
                bar.show(sum(c for c, _ in files.values()), sum(t for _, t in files.values()))
            elif item.get("status") == "success":
                break
    finally:
        bar.close()
    print("success", file=out)


# ---- ls, ps ----


def ago(seconds: float) -> str:
    elapsed = max(0.0, time.time() - seconds)
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if elapsed >= size:
            n = int(elapsed // size)
            return f"{n} {unit}{'s' if n != 1 else ''} ago"
    return "just now"


def list_store(client: NodeClient) -> list[list[str]]:
    from datetime import datetime

    rows = [["NAME", "SIZE", "MODIFIED"]]
    for model in client.call("GET", "/api/tags")["models"]:
        name = str(model["name"]).removesuffix(":latest")
        if model.get("complete") is False:
            name += " (partial)"
        modified = datetime.fromisoformat(str(model["modified_at"]).replace("Z", "+00:00"))
        rows.append([name, human_bytes(model.get("size", 0)), ago(modified.timestamp())])
    return rows


def list_running(client: NodeClient) -> list[list[str]]:
    state = client.call("GET", "/state")
    rows = [["ID", "MODEL", "STATE", "NODES (LAYERS)", "MEMORY", "TOKENS/S"]]
    for instance in state["instances"]:
        shards = instance["shards"]
        where = ", ".join(f"{s['node_id']}[{s['start_layer']}:{s['end_layer']}]" for s in shards)
        memory = sum(int(s.get("memory_bytes", 0)) for s in shards)
        rate = instance.get("tokens_per_second")
        rows.append(
            [
                instance["id"],
                instance["model"],
                instance["state"] + (f" ({instance['error']})" if instance.get("error") else ""),
                where,
                human_bytes(memory) if memory else "-",
                f"{rate:.1f}" if isinstance(rate, int | float) and rate > 0 else "-",
            ]
        )
    return rows


def print_table(rows: Sequence[Sequence[str]], out: TextIO | None = None) -> None:
    out = out or sys.stdout
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print("  ".join(cells).rstrip(), file=out)


# ---- run ----


def ensure_loaded(client: NodeClient, model: str) -> None:
    """As `ollama run` does: pull the model if the node has never heard of it, then
    load it (a generate request without a prompt loads and returns)."""
    try:
        client.call("POST", "/api/show", {"model": model})
    except ClientError as exc:
        if exc.status != 404:
            raise
        pull(client, model)
    with client.request("POST", "/api/generate", {"model": model, "stream": False}, None) as r:
        r.read()


def run(
    client: NodeClient,
    model: str,
    prompt: str,
    max_tokens: int | None,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
) -> None:
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    ensure_loaded(client, model)
    chat = Chat(client, model, max_tokens, stdout)
    if prompt:
        chat.turn(prompt)
        return
    if not stdin.isatty():
        # `echo question | exo-trio run MODEL`: the whole input is one prompt.
        chat.turn(stdin.read())
        return
    chat.repl(stdin)


class Chat:
    def __init__(self, client: NodeClient, model: str, max_tokens: int | None, out: TextIO) -> None:
        self.client = client
        self.model = model
        self.options: dict[str, Any] = {} if max_tokens is None else {"num_predict": max_tokens}
        self.out = out
        self.history: list[dict[str, str]] = []

    def turn(self, text: str) -> None:
        """Send one user message and write the answer as it streams. Ctrl-C stops the
        answer (the connection closes, so the node stops generating) and the turn
        is forgotten."""
        messages = [*self.history, {"role": "user", "content": text}]
        body = {"model": self.model, "messages": messages, "stream": True}
        if self.options:
            body["options"] = self.options
        answer = []
        try:
            for item in self.client.lines("/api/chat", body):
                piece = item.get("message", {}).get("content", "")
                if piece:
                    answer.append(piece)
                    self.out.write(piece)
                    self.out.flush()
        except KeyboardInterrupt:
            self.out.write("\n")
            self.out.flush()
            return
        self.out.write("\n\n")
        self.out.flush()
        self.history = [*messages, {"role": "assistant", "content": "".join(answer)}]

    def repl(self, stdin: TextIO) -> None:
        while True:
            try:
                text = read_message(stdin, self.out)
            except KeyboardInterrupt:
                self.out.write("\nUse Ctrl + d or /bye to exit.\n")
                continue
            except EOFError:
                self.out.write("\n")
                return
            command = text.strip()
            if not command:
                continue
            if command == "/bye":
                return
            if command in ("/?", "/help"):
                self.out.write(HELP + "\n")
                continue
            if command == "/clear":
                self.history = []
                self.out.write("Cleared session context\n")
                continue
            self.turn(text)


def read_message(stdin: TextIO, out: TextIO) -> str:
    """One message: a line, or the lines between two \"\"\" (either may share a line
    with text). Raises EOFError at the end of input."""
    line = prompt_line(">>> ", stdin, out)
    if not line.lstrip().startswith(MULTILINE):
        return line
    body = line.lstrip()[len(MULTILINE) :]
    lines = []
    while not body.rstrip().endswith(MULTILINE):
        lines.append(body)
        body = prompt_line("... ", stdin, out)
    lines.append(body.rstrip()[: -len(MULTILINE)])
    return "\n".join(lines).strip("\n")


def prompt_line(prompt: str, stdin: TextIO, out: TextIO) -> str:
    if stdin is sys.stdin and out is sys.stdout:
        return input(prompt)  # line editing (readline) when on a terminal
    out.write(prompt)
    out.flush()
    line = stdin.readline()
    if not line:
        raise EOFError
    return line.rstrip("\n")
