"""A local server speaking the Hugging Face Hub's file API, for tests (point
HF_ENDPOINT at it).

It serves what huggingface_hub asks of the hub to download a model (read from
huggingface_hub's file_download.py, hf_api.py and utils/_http.py):

- `GET /api/models/ORG/NAME[/revision/REV][?blobs=true]`: the model info, with the
  commit (`sha`) and the files (`siblings`: `rfilename`, `size`, `blobId`, `lfs`).
- `GET /api/models/ORG/NAME/tree/REV[/PATH]`: the file listing (`type`, `path`,
  `size`, `oid`, `lfs`), all in one page.
- `HEAD` and `GET /ORG/NAME/resolve/REV/PATH`: the file, with `X-Repo-Commit`,
  `ETag` (and `X-Linked-Etag` / `X-Linked-Size` for large files, as the hub sends
  them for LFS files), `Content-Length`, `Accept-Ranges`; a `Range: bytes=N-` GET
  answers 206 with `Content-Range`.
- Errors as the hub gives them: 404 with `X-Error-Code: RepoNotFound`,
  `RevisionNotFound` or `EntryNotFound`.

Faults for the tests: `cut_after(path, n)` ends the next GET of a file after n
bytes (the connection closes mid-body), `hold_after(path, n)` sends n bytes and
then waits until `release()`. Every request is logged (`requests`) with its Range
header, and the bytes sent per file are counted (`bytes_sent`).
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LARGE_FILE = 10 * 1024  # files above this are "LFS" files, as the hub stores weights


@dataclass
class HubFile:
    content: bytes | None  # None: a listed file too big to serve (only its size is known)
    size: int

    @property
    def sha256(self) -> str:
        if self.content is None:
            return hashlib.sha256(str(self.size).encode()).hexdigest()
        return hashlib.sha256(self.content).hexdigest()

    @property
    def git_oid(self) -> str:
        data = self.content or b""
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()

    @property
    def is_lfs(self) -> bool:
        return self.size > LARGE_FILE

    @property
    def etag(self) -> str:
        return self.sha256 if self.is_lfs else self.git_oid


@dataclass
class HubRepo:
    files: dict[str, HubFile]
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag -> commit

    @property
    def commit(self) -> str:
        h = hashlib.sha1()
        for path in sorted(self.files):
            h.update(f"{path}:{self.files[path].sha256}\n".encode())
        return h.hexdigest()


@dataclass
class Fault:
    after: int
    hold: bool  # wait for release() after `after` bytes, instead of cutting


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, HubRepo] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # method, path, Range
        self.bytes_sent: dict[str, int] = {}
        self._faults: dict[str, Fault] = {}
        self._released = threading.Event()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # ---- content ----

    def add_repo(self, repo: str, files: dict[str, bytes | int], tags: tuple[str, ...] = ()) -> str:
        """Add a repo; an int instead of bytes lists a file of that size that is
        never served. Returns its commit."""
        hub_files = {
            path: HubFile(None, data) if isinstance(data, int) else HubFile(data, len(data))
            for path, data in files.items()
        }
        entry = HubRepo(hub_files)
        commit = entry.commit
        entry.refs = {"main": commit, **{t: commit for t in tags}}
        self.repos[repo] = entry
        return commit

    def add_model_dir(self, repo: str, directory: Path, **extra: bytes | int) -> str:
        files: dict[str, bytes | int] = {
            p.relative_to(directory).as_posix(): p.read_bytes()
            for p in sorted(directory.rglob("*"))
            if p.is_file() and not p.name.startswith(".")
        }
        files.update({k.replace("__", "/"): v for k, v in extra.items()})
        return self.add_repo(repo, files)

    # ---- faults ----

    def cut_after(self, path: str, n: int) -> None:
        self._faults[path] = Fault(n, hold=False)

    def hold_after(self, path: str, n: int) -> None:
        self._released.clear()
        self._faults[path] = Fault(n, hold=True)

    def release(self) -> None:
        self._released.set()

    def ranges(self, path: str) -> list[str | None]:
        """The Range headers of the GETs of a file, in order."""
        return [r for m, p, r in self.requests if m == "GET" and p.endswith("/" + path)]

    # ---- serving ----

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._released.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def take_fault(self, path: str) -> Fault | None:
        with self._lock:
            return self._faults.pop(path, None)

    def count(self, path: str, n: int) -> None:
        with self._lock:
            self.bytes_sent[path] = self.bytes_sent.get(path, 0) + n


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        return None

    def do_HEAD(self) -> None:
        self._route(body=False)

    def do_GET(self) -> None:
        self._route(body=True)

    # ---- routing ----

    def _route(self, body: bool) -> None:
        url = urlsplit(self.path)
        self.hub.requests.append((self.command, url.path, self.headers.get("Range")))
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            self._api(parts[2:], body)
        elif len(parts) >= 5 and parts[2] == "resolve":
            self._resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]), body)
        else:
            self._error(404, "RepoNotFound", "not found", body)

    def _repo(self, repo_id: str, revision: str, body: bool) -> tuple[HubRepo, str] | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", f"Repository {repo_id} not found", body)
            return None
        commit = repo.refs.get(revision, revision if revision == repo.commit else None)
        if commit is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", body)
            return None
        return repo, commit

    def _api(self, parts: list[str], body: bool) -> None:
        repo_id = "/".join(parts[:2])
        rest = parts[2:]
        if not rest:
            revision = "main"
        elif rest[0] in ("revision", "tree") and len(rest) >= 2:
            revision = rest[1]
        else:
            self._error(404, "RepoNotFound", "not found", body)
            return
        found = self._repo(repo_id, revision, body)
        if found is None:
            return
        repo, commit = found
        if rest and rest[0] == "tree":
            prefix = "/".join(rest[2:])
            entries = [
                {
                    "type": "file",
                    "oid": f.git_oid,
                    "size": f.size,
                    "path": path,
                    # The tree API names the LFS hash `oid`; the model info `sha256`.
                    **({"lfs": _lfs(f, "oid")} if f.is_lfs else {}),
                }
                for path, f in sorted(repo.files.items())
                if not prefix or path.startswith(prefix + "/")
            ]
            self._json(entries, body)
            return
        info = {
            "_id": commit[:24],
            "id": repo_id,
            "modelId": repo_id,
            "author": repo_id.split("/")[0],
            "sha": commit,
            "private": False,
            "disabled": False,
            "gated": False,
            "tags": ["mlx"],
            "siblings": [
                {
                    "rfilename": path,
                    "size": f.size,
                    "blobId": f.git_oid,
                    **({"lfs": _lfs(f)} if f.is_lfs else {}),
                }
                for path, f in sorted(repo.files.items())
            ],
        }
        self._json(info, body)

    def _resolve(self, repo_id: str, revision: str, path: str, body: bool) -> None:
        found = self._repo(repo_id, revision, body)
        if found is None:
            return
        repo, commit = found
        f = repo.files.get(path)
        if f is None:
            self._error(404, "EntryNotFound", f"{path} does not exist", body, commit=commit)
            return
        start = 0
        requested = self.headers.get("Range")
        if requested and requested.startswith("bytes=") and requested.endswith("-"):
            start = int(requested[len("bytes=") : -1])
        if f.content is None and body:
            self._error(500, "", "this file is only listed, never served", body)
            return
        status = 206 if start else 200
        self.send_response(status)
        self.send_header("X-Repo-Commit", commit)
        self.send_header("ETag", f'"{f.etag}"')
        if f.is_lfs:
            self.send_header("X-Linked-Etag", f'"{f.etag}"')
            self.send_header("X-Linked-Size", str(f.size))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(f.size - start))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{f.size - 1}/{f.size}")
        self.end_headers()
        if not body:
            return
        assert f.content is not None
        self._send_body(path, f.content[start:])

    def _send_body(self, path: str, data: bytes) -> None:
        fault = self.hub.take_fault(path)
        if fault is not None:
            head = data[: fault.after]
            self.wfile.write(head)
            self.wfile.flush()
            self.hub.count(path, len(head))
            if fault.hold:
                self.hub._released.wait(60)
            # Either way the rest never comes on this connection.
            self.close_connection = True
            self.connection.shutdown(2)
            return
        self.wfile.write(data)
        self.hub.count(path, len(data))

    # ---- responses ----

    def _json(self, value: object, body: bool) -> None:
        data = json.dumps(value).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _error(self, status: int, code: str, message: str, body: bool, commit: str = "") -> None:
        data = json.dumps({"error": message}).encode()
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        if commit:
            self.send_header("X-Repo-Commit", commit)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)


def _lfs(f: HubFile, hash_key: str = "sha256") -> dict[str, object]:
    return {hash_key: f.sha256, "size": f.size, "pointerSize": 134}


def split_weights(model_dir: Path, out_dir: Path) -> Path:
    """A copy of a model directory with its weights split the way big hub models
    are: `model-0000K-of-0000N.safetensors` files and a `model.safetensors.index.json`.
    One file holds every tensor outside the decoder layers, then one file per layer."""
    import shutil

    import mlx.core as mx

    out_dir.mkdir(parents=True, exist_ok=True)
    for p in model_dir.iterdir():
        if p.is_file() and p.name != "model.safetensors":
            shutil.copy(p, out_dir / p.name)
    from exo_trio.hub_plan import tensor_layer

    weights = mx.load(str(model_dir / "model.safetensors"))
    groups: dict[int, dict[str, mx.array]] = {}
    for name, array in weights.items():
        layer = tensor_layer(name)
        groups.setdefault(-1 if layer is None else layer, {})[name] = array
    order = sorted(groups)
    weight_map = {}
    for i, key in enumerate(order, start=1):
        file = f"model-{i:05d}-of-{len(order):05d}.safetensors"
        mx.save_safetensors(str(out_dir / file), groups[key], metadata={"format": "mlx"})
        weight_map.update({name: file for name in groups[key]})
    total = sum(a.nbytes for a in weights.values())
    (out_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    return out_dir
