"""`pocketlm pull` against a local hub: a threaded HTTP server on 127.0.0.1 that answers the endpoints
huggingface_hub uses (model_info with file metadata, HEAD and GET of /resolve/ with ETag, X-Repo-Commit,
X-Linked-Etag/X-Linked-Size and Range), serving a tiny model's files. Faults are injected per file: a
connection cut after N bytes, corrupted bytes, a gated (401) or missing (404) repository."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
import time
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import pocketlm
from pocketlm import cli
from pocketlm.errors import ModelNotFoundError, StoreError
from pocketlm.store import Store
from pocketlm.store.pull import pull

LFS = (".safetensors", ".gguf", ".bin")
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class Hub:
    """What the server serves and what it was asked for."""

    def __init__(self):
        self.repos: dict[str, dict] = {}
        self.log: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self.cuts: dict[str, list[int]] = {}  # file name -> bytes to send before cutting, one per coming GET
        self.corrupt: set[str] = set()
        self.lock = threading.Lock()

    def add(self, repo: str, files: dict[str, bytes], *, token: str | None = None, commit: str = COMMIT):
        self.repos[repo] = {"files": files, "token": token, "commit": commit}

    def gets(self, name: str) -> list[str | None]:
        return [r for m, p, r in self.log if m == "GET" and p.endswith("/" + name)]


def _etag(name: str, data: bytes) -> str:
    if name.endswith(LFS):
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):  # quiet
        pass

    @property
    def hub(self) -> Hub:
        return self.server.hub

    def _send(self, code: int, body: bytes = b"", headers: dict | None = None, *, head: bool = False):
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _error(self, code: int, error_code: str, message: str, head: bool = False):
        body = json.dumps({"error": message}).encode()
        self._send(code, body, {"X-Error-Code": error_code, "X-Error-Message": message,
                                "Content-Type": "application/json"}, head=head)

    def do_HEAD(self):
        self._route(head=True)

    def do_GET(self):
        self._route(head=False)

    def _route(self, head: bool):
        path = self.path.split("?", 1)[0]
        with self.hub.lock:
            self.hub.log.append((self.command, path, self.headers.get("Range")))
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"]:
            repo = "/".join(parts[2:4])
            return self._model_info(repo, head)
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve("/".join(parts[:2]), parts[3], "/".join(parts[4:]), head)
        self._error(404, "EntryNotFound", f"no route {path}", head)

    def _repo(self, repo: str, head: bool):
        r = self.hub.repos.get(repo)
        if r is None:
            self._error(404, "RepoNotFound", "Repository not found", head)
        return r

    def _model_info(self, repo: str, head: bool):
        r = self._repo(repo, head)
        if r is None:
            return
        siblings = []
        for name, data in r["files"].items():
            s = {"rfilename": name, "size": len(data)}
            if name.endswith(LFS):
                s["blobId"] = hashlib.sha1(name.encode()).hexdigest()
                s["lfs"] = {"size": len(data), "sha256": _etag(name, data), "pointerSize": 134}
            else:
                s["blobId"] = _etag(name, data)
            siblings.append(s)
        body = json.dumps({"id": repo, "sha": r["commit"], "siblings": siblings, "private": False,
                           "gated": "manual" if r["token"] else False}).encode()
        self._send(200, body, {"Content-Type": "application/json"}, head=head)

    def _resolve(self, repo: str, rev: str, name: str, head: bool):
        r = self._repo(repo, head)
        if r is None:
            return
        if r["token"] and self.headers.get("Authorization") != f"Bearer {r['token']}":
            return self._error(401, "GatedRepo", f"Access to model {repo} is restricted.", head)
        if rev not in ("main", r["commit"]):
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
        if name not in r["files"]:
            return self._error(404, "EntryNotFound", f"{name} does not exist", head)
        data = r["files"][name]
        etag = _etag(name, data)
        headers = {"ETag": f'"{etag}"', "X-Repo-Commit": r["commit"], "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if name.endswith(LFS):
            headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(data))})
        if name in self.hub.corrupt and not head:
            data = bytes(b ^ 0xFF for b in data[:64]) + data[64:]
        start = 0
        rng = self.headers.get("Range")
        code = 200
        if rng and not head:
            start = int(rng.split("=")[1].split("-")[0])
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            code = 206
        body = data[start:]
        cut = None
        if not head:
            with self.hub.lock:
                queue = self.hub.cuts.get(name)
                if queue:
                    cut = queue.pop(0)
        if cut is None:
            return self._send(code, body, headers, head=head)
        self.send_response(code)  # announce the whole body, send `cut` bytes of it, drop the connection
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[:cut])
        self.wfile.flush()
        self.close_connection = True


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory) -> dict[str, bytes]:
    """The files of a tiny Phi-3 checkpoint (bf16) as a hub repository holds them, with files pull must skip."""
    from pocketlm.formats.hf import save_checkpoint
    folder = tmp_path_factory.mktemp("tiny")
    save_checkpoint(pocketlm.load("tiny", seed=1), folder, dtype="bfloat16", tokenizer=pocketlm.Tokenizer.default())
    files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    files["LICENSE"] = b"MIT License\n\nCopyright (c) test\n"
    files["README.md"] = b"# tiny\n"
    files["modeling_phi3.py"] = b"# remote code pocketlm never runs\n"
    files["pytorch_model.bin"] = b"\0" * 1000  # a second copy of the weights in a format pull skips
    return files


@pytest.fixture
def hub(monkeypatch, tmp_path):
    state = Hub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.hub = state
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("POCKETLM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for var in ("HF_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    import huggingface_hub.file_download as fd  # its retries after a dropped connection sleep 1 s each
    monkeypatch.setattr(fd, "time", types.SimpleNamespace(sleep=lambda s: None, time=time.time))
    yield state
    server.shutdown()
    server.server_close()


def _files_in_store(name: str) -> list[str]:
    return sorted(p.name for p in (Store().get(name).folder / "model").iterdir())


def test_pull_then_run_by_name(hub, tiny_files, capsys):
    hub.add("test/tiny-phi3", tiny_files)
    assert cli.main(["pull", "hf.co/test/tiny-phi3"]) == 0
    assert _files_in_store("hf.co/test/tiny-phi3") == sorted(
        n for n in tiny_files if n not in ("README.md", "modeling_phi3.py", "pytorch_model.bin"))
    capsys.readouterr()
    assert cli.main(["run", "hf.co/test/tiny-phi3", "Hello", "--max-tokens", "6"]) == 0
    by_name = capsys.readouterr().out
    folder = Store().get("hf.co/test/tiny-phi3").weights
    assert cli.main(["run", str(folder), "Hello", "--max-tokens", "6"]) == 0
    assert capsys.readouterr().out == by_name and by_name.strip()
    assert cli.main(["list"]) == 0
    listing = capsys.readouterr().out
    assert "hf.co/test/tiny-phi3" in listing and "safetensors" in listing and "bfloat16" in listing
    assert cli.main(["show", "hf.co/test/tiny-phi3"]) == 0
    shown = capsys.readouterr().out
    assert "Phi3ForCausalLM" in shown and "MIT License" in shown and "model.safetensors" in shown
    assert "4096" in shown and COMMIT[:12] in shown
    # the library entry point takes store names too
    assert pocketlm.load("hf.co/test/tiny-phi3").config.hidden_size == 256


@pytest.mark.parametrize("tag,preset,arch", [("phi3.5:moe", "tiny-moe", "PhimoeForCausalLM"),
                                             ("phi3:small", "tiny-small", "Phi3SmallForCausalLM"),
                                             ("phi3.5:vision", "tiny-vision", "Phi3VForCausalLM")])
def test_the_other_family_members_pull_and_run(hub, tmp_path, capsys, tag, preset, arch):
    from pocketlm.formats.hf import save_checkpoint
    from pocketlm.store.registry import TAGS
    model = pocketlm.load(preset, seed=1)
    tokenizer = None if preset == "tiny-small" else pocketlm.Tokenizer.default()
    save_checkpoint(model, tmp_path / "ckpt", dtype="bfloat16", tokenizer=tokenizer)
    hub.add(TAGS[tag].repo, {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()})
    entry = pull(tag)
    assert entry.manifest["architecture"] == arch
    assert entry.manifest["parameters"] == sum(p.numel() for p in model.parameters())
    capsys.readouterr()
    assert cli.main(["run", tag, "Hello", "--max-tokens", "4"]) == 0
    by_tag = capsys.readouterr().out
    assert cli.main(["run", str(Store().get(tag).weights), "Hello", "--max-tokens", "4"]) == 0
    assert capsys.readouterr().out == by_tag and by_tag.count("\n") >= 1
    assert type(pocketlm.load(tag)).__name__ == type(model).__name__


def test_family_tag_maps_to_microsoft_repo(hub, tiny_files):
    hub.add("microsoft/Phi-3-mini-4k-instruct", tiny_files)
    entry = pull("phi3")  # the alias of phi3:mini
    assert entry.name == "phi3:mini"
    assert entry.manifest["source"]["repo"] == "microsoft/Phi-3-mini-4k-instruct"
    assert all(p == "/api/models/microsoft/Phi-3-mini-4k-instruct/revision/main" or "/resolve/" in p
               for _, p, _ in hub.log)
    # pulling again at the same commit downloads nothing
    n = len(hub.gets("model.safetensors"))
    pull("phi3:mini")
    assert len(hub.gets("model.safetensors")) == n


def test_gguf_tag_downloads_one_file(hub, tiny_files, tmp_path, capsys):
    from test_checkpoint import write_phi3_gguf
    write_phi3_gguf(pocketlm.load("tiny", seed=1), tmp_path / "q.gguf")
    hub.add("microsoft/Phi-3-mini-4k-instruct-gguf", {"Phi-3-mini-4k-instruct-q4.gguf": (tmp_path / "q.gguf").read_bytes(),
                                                      "Phi-3-mini-4k-instruct-fp16.gguf": b"\0" * 100,
                                                      "LICENSE": b"MIT\n"})
    entry = pull("phi3:mini-q4")
    assert _files_in_store("phi3:mini-q4") == ["LICENSE", "Phi-3-mini-4k-instruct-q4.gguf"]
    assert entry.weights.suffix == ".gguf" and entry.manifest["format"] == "gguf"
    capsys.readouterr()
    assert cli.main(["run", "phi3:mini-q4", "Hi", "--max-tokens", "3"]) == 0
    assert capsys.readouterr().out.strip()


def test_interrupted_download_resumes_by_range(hub, tiny_files):
    hub.add("test/tiny-phi3", tiny_files)
    size = len(tiny_files["model.safetensors"])
    hub.cuts["model.safetensors"] = [size // 3]  # the first GET drops the connection a third of the way
    pull("hf.co/test/tiny-phi3")
    ranges = hub.gets("model.safetensors")
    assert ranges[0] is None and len(ranges) == 2
    resumed_at = int(ranges[1].removeprefix("bytes=").removesuffix("-"))
    assert 0 < resumed_at <= size // 3  # from what was written (huggingface_hub writes whole chunks)
    assert Store().get("hf.co/test/tiny-phi3").weights.joinpath("model.safetensors").read_bytes() == \
        tiny_files["model.safetensors"]


def test_failed_pull_leaves_nothing_loadable_and_next_pull_resumes(hub, tiny_files, capsys):
    hub.add("test/tiny-phi3", tiny_files)
    size = len(tiny_files["model.safetensors"])
    hub.cuts["model.safetensors"] = [size // 2] + [10] * 5  # more drops than huggingface_hub retries
    with pytest.raises(StoreError, match="cannot reach the hub.*pull` again resumes"):
        pull("hf.co/test/tiny-phi3")
    partial = list(Store().staging("hf.co/test/tiny-phi3").rglob("*.part"))
    assert len(partial) == 1 and 0 < partial[0].stat().st_size < size
    kept = partial[0].stat().st_size
    assert Store().entries() == []  # a half-downloaded model is never listed ...
    assert cli.main(["run", "hf.co/test/tiny-phi3", "Hi"]) == 2  # ... nor loaded
    assert "pocketlm pull hf.co/test/tiny-phi3" in capsys.readouterr().err
    pull("hf.co/test/tiny-phi3")
    assert hub.gets("model.safetensors")[-1] == f"bytes={kept}-"
    assert len(hub.gets("config.json")) == 1  # files completed by the first pull are not fetched again
    assert not Store().staging("hf.co/test/tiny-phi3").exists()


def test_corrupted_file_is_rejected_by_its_hash(hub, tiny_files):
    hub.add("test/tiny-phi3", tiny_files)
    hub.corrupt.add("model.safetensors")
    with pytest.raises(StoreError, match=r"model.safetensors.*sha256"):
        pull("hf.co/test/tiny-phi3")
    assert Store().entries() == []
    assert not (Store().staging("hf.co/test/tiny-phi3") / "model" / "model.safetensors").exists()
    hub.corrupt.clear()  # the next pull downloads it afresh
    assert pull("hf.co/test/tiny-phi3").weights.joinpath("model.safetensors").read_bytes() == \
        tiny_files["model.safetensors"]


def test_corrupted_small_file_is_rejected_by_its_git_hash(hub, tiny_files):
    files = dict(tiny_files)
    files["config.json"] = files["config.json"] + b" " * 80  # over 64 bytes, so the fault flips real bytes
    hub.add("test/tiny-phi3", files)
    hub.corrupt.add("config.json")
    with pytest.raises(StoreError, match=r"config.json.*git-sha1"):
        pull("hf.co/test/tiny-phi3")


def test_missing_repository_is_one_clear_error(hub, capsys):
    with pytest.raises(ModelNotFoundError, match="repository test/nothing was not found on http://127.0.0.1"):
        pull("hf.co/test/nothing")
    assert cli.main(["pull", "hf.co/test/nothing"]) == 2
    err = capsys.readouterr().err
    assert "was not found" in err and "Traceback" not in err


def test_gated_repository_needs_a_token(hub, tiny_files, monkeypatch):
    hub.add("test/gated", tiny_files, token="hf_secret")
    with pytest.raises(StoreError, match="gated repository.*HF_TOKEN"):
        pull("hf.co/test/gated")
    assert Store().entries() == []
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    assert pull("hf.co/test/gated").name == "hf.co/test/gated"


def test_unknown_tag_and_unsupported_models_fail_before_any_request(hub, capsys, monkeypatch):
    with pytest.raises(ModelNotFoundError, match="phi3:giant.*not a tag.*phi3:mini"):
        pull("phi3:giant")
    from pocketlm.store import registry
    monkeypatch.setitem(registry.TAGS, "phi3:giant", registry.Source("microsoft/Phi-3-giant",
                                                                     unsupported="Phi-3-giant is not implemented"))
    with pytest.raises(StoreError, match="Phi-3-giant is not implemented.*does not download"):
        pull("phi3:giant")
    assert hub.log == []
    assert cli.main(["pull", "Not A Name!"]) == 2
    assert "not a model name" in capsys.readouterr().err


def test_repository_pocketlm_cannot_run_stops_after_config(hub, tiny_files):
    files = dict(tiny_files)
    files["config.json"] = json.dumps({"architectures": ["MistralForCausalLM"], "model_type": "mistral"}).encode()
    hub.add("test/mistral", files)
    with pytest.raises(StoreError, match="cannot run this model.*mistral"):
        pull("hf.co/test/mistral")
    assert hub.gets("model.safetensors") == []


def test_disk_full_is_refused_before_downloading(hub, tiny_files, monkeypatch):
    hub.add("test/tiny-phi3", tiny_files)
    import pocketlm.store.pull as pull_module
    monkeypatch.setattr(pull_module.shutil, "disk_usage", lambda p: types.SimpleNamespace(total=10**9, used=10**9,
                                                                                          free=10**6))
    with pytest.raises(StoreError, match=r"not enough free disk space: the download needs \d+\.\d MB"):
        pull("hf.co/test/tiny-phi3")
    assert [p for m, p, _ in hub.log if "/resolve/" in p] == []


def test_concurrent_pulls_of_one_name(hub, tiny_files):
    hub.add("test/tiny-phi3", tiny_files)
    results, errors = [], []

    def work():
        try:
            results.append(pull("hf.co/test/tiny-phi3"))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and len(results) == 3
    assert len([r for r in hub.gets("model.safetensors") if r is None]) == 1  # downloaded once
    entry = Store().get("hf.co/test/tiny-phi3")
    assert entry.weights.joinpath("model.safetensors").read_bytes() == tiny_files["model.safetensors"]
    assert [e.name for e in Store().entries()] == ["hf.co/test/tiny-phi3"]


def test_offline_fails_fast_with_a_clear_error(hub, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(StoreError, match="HF_HUB_OFFLINE"):
        pull("phi3:mini")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there: connection refused
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    t0 = time.monotonic()
    assert cli.main(["pull", "phi3:mini"]) == 2
    assert time.monotonic() - t0 < 10
    err = capsys.readouterr().err
    assert "cannot reach the hub" in err and "Traceback" not in err


def test_quantized_tag_is_made_locally(hub, tiny_files, capsys):
    hub.add("microsoft/Phi-3-mini-4k-instruct", tiny_files)
    entry = pull("phi3:mini-q4_k")
    assert entry.manifest["quantization"] == "Q4_K"
    assert entry.manifest["source"]["quantized_here"] == "q4_k"
    assert (entry.weights / "LICENSE").is_file()
    capsys.readouterr()
    assert cli.main(["run", "phi3:mini-q4_k", "Hi", "--max-tokens", "3"]) == 0
    assert capsys.readouterr().out.strip()
    shutil.rmtree(entry.folder)
