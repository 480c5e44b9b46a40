"""The client commands' pure parts: the node address, the chat's message reading,
tables. (The commands against a running node: tests/test_models_e2e.py.)"""

from __future__ import annotations

import io

import pytest

from exo_trio.client import ClientError, base_url, error_message
from exo_trio.client_cli import print_table, read_message


def test_the_node_address_takes_a_host_a_port_or_a_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EXO_TRIO_HOST", raising=False)
    assert base_url(None) == "http://127.0.0.1:52415"
    assert base_url("box") == "http://box:52415"
    assert base_url("box:8000") == "http://box:8000"
    assert base_url("https://box.example/") == "https://box.example"
    assert base_url("[::1]:9000") == "http://[::1]:9000"
    monkeypatch.setenv("EXO_TRIO_HOST", "10.0.0.2:1234")
    assert base_url(None) == "http://10.0.0.2:1234"
    with pytest.raises(ClientError):
        base_url("ftp://box")


def test_error_messages_come_out_of_every_dialects_envelope() -> None:
    assert error_message(404, b'{"error": {"message": "no such model"}}') == "no such model"
    assert error_message(404, b'{"error": "model not found"}') == "model not found"
    assert error_message(502, b"Bad Gateway") == "Bad Gateway"


def read_all(text: str) -> list[str]:
    stdin, out = io.StringIO(text), io.StringIO()
    messages = []
    while True:
        try:
            messages.append(read_message(stdin, out))
        except EOFError:
            return messages


def test_a_message_is_a_line_or_the_lines_between_triple_quotes() -> None:
    assert read_all("hello\nworld\n") == ["hello", "world"]
    assert read_all('"""first\nsecond\nthird"""\nafter\n') == ["first\nsecond\nthird", "after"]
    assert read_all('"""\nindented\n  kept\n"""\n') == ["indented\n  kept"]
    assert read_all('"""one line"""\n') == ["one line"]
    assert read_all('"""never closed\n') == []  # the end of input ends the session


def test_tables_line_up() -> None:
    out = io.StringIO()
    print_table([["NAME", "SIZE"], ["org/a-long-name", "1 MB"], ["b", "22 GB"]], out)
    assert out.getvalue().splitlines() == [
        "NAME             SIZE",
        "org/a-long-name  1 MB",
        "b                22 GB",
    ]
