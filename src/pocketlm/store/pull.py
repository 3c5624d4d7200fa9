"""`pocketlm pull NAME`: download a model from the Hugging Face hub into the store, verified and atomic.

Steps, each one before anything irreversible:
1. The name resolves to a repository (registry.py); a model pocketlm cannot run is refused here.
2. The repository's metadata (one API call, with a timeout): the commit, every file's size and hash.
   HF_HUB_OFFLINE=1 or an unreachable hub fails here, quickly, with a message that says so.
3. Free disk space is checked against what is still to download (and the local quantization's output).
4. `config.json` first: a model whose architecture pocketlm cannot load fails before the weights come.
5. Each file through huggingface_hub's own pieces (`get_hf_file_metadata` for the HEAD with its gated/401
   handling and redirects, `http_get` for the transfer with its retries, timeouts and progress bar) into
   `.partial/<name>/`: the bytes go to a `.part` file named after the file's etag and kept across runs, so an
   interrupted pull continues where it stopped, by HTTP Range, in this process or the next. (huggingface_hub's
   `hf_hub_download` itself drops its partial file when a download fails, so it cannot resume across runs.)
   Each file is then checked against the hub's hash (sha256 for LFS files, the git blob sha1 for the others);
   a mismatch deletes it and fails.
6. Optional local quantization (`phi3:mini-q4_k`), then one `os.replace` into the store.

The hub is `HF_ENDPOINT` (default https://huggingface.co); `HF_TOKEN` opens gated repositories.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import shutil
import sys
import time
from pathlib import Path
from urllib.parse import quote

from pocketlm.errors import ModelNotFoundError, PocketLMError, StoreError
from pocketlm.fsutil import sha256_file
from pocketlm.store.registry import canonical, source_for
from pocketlm.store.store import WEIGHTS_DIR, Entry, Store

TIMEOUT_S = 10.0  # metadata calls: an unreachable hub fails in seconds, never hangs
CHECKPOINT_FILES = ("*.json", "*.safetensors", "tokenizer.model", "LICENSE", "LICENSE.*", "NOTICE*")
SKIP_FILES = ("*.gguf", "*.bin", "*.pt", "*.pth", "*.onnx", "*.onnx_data", "*.h5", "*.msgpack")
DISK_MARGIN = 64 * 2**20
_NETWORK_ERRORS = {"ConnectError", "ConnectTimeout", "ReadTimeout", "TimeoutException", "RemoteProtocolError",
                   "ConnectionError", "Timeout", "NetworkError", "ProxyError", "OfflineModeIsEnabled",
                   "LocalEntryNotFoundError", "TransportError"}


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def _is_network_error(e: BaseException) -> bool:
    names = {c.__name__ for c in type(e).__mro__}
    return bool(names & _NETWORK_ERRORS) or isinstance(e, (ConnectionError, TimeoutError))


def _hub_error(e: BaseException, repo: str, endpoint: str, what: str) -> PocketLMError:
    """A huggingface_hub / network exception as one typed pocketlm error that says what to do."""
    from huggingface_hub import errors as hfe
    token_hint = "set HF_TOKEN to a token of an account that has access" if not os.environ.get("HF_TOKEN") else \
        "the HF_TOKEN given has no access to it"
    if isinstance(e, hfe.GatedRepoError):
        return StoreError(f"{repo} is a gated repository: accept its licence at {endpoint}/{repo} and {token_hint} "
                          f"(while fetching {what})")
    if isinstance(e, hfe.RepositoryNotFoundError):
        return ModelNotFoundError(f"repository {repo} was not found on {endpoint} (if it is private or gated, "
                                  f"{token_hint})")
    if isinstance(e, hfe.RevisionNotFoundError):
        return ModelNotFoundError(f"{repo}: revision not found on {endpoint}")
    if isinstance(e, hfe.EntryNotFoundError):
        return ModelNotFoundError(f"{repo}: {what} is not in the repository on {endpoint}")
    if _is_network_error(e):
        return StoreError(f"cannot reach the hub at {endpoint} ({type(e).__name__}: {e}) while fetching {what}; "
                          "check the network (or HF_ENDPOINT). Models already in the store run offline; "
                          "`pocketlm pull` again resumes the download")
    if isinstance(e, hfe.HfHubHTTPError):
        return StoreError(f"the hub at {endpoint} refused {what} of {repo}: {str(e).splitlines()[0]}")
    return StoreError(f"{what} of {repo} from {endpoint} failed: {type(e).__name__}: {e}")


def _select(siblings, source) -> list:
    """The files of the repository that make the model (see CHECKPOINT_FILES), config.json first."""
    by_name = {s.rfilename: s for s in siblings}
    licence = [s for s in siblings if fnmatch.fnmatch(s.rfilename, "LICENSE*") and "/" not in s.rfilename]
    if source.file is not None:
        if source.file not in by_name:
            ggufs = sorted(n for n in by_name if n.endswith(".gguf"))
            raise ModelNotFoundError(f"{source.repo} has no file {source.file!r}"
                                     + (f"; its GGUF files: {', '.join(ggufs)}" if ggufs else ""))
        if not source.file.endswith(".gguf"):
            raise StoreError(f"hf.co/{source.repo}:{source.file}: a single file must be a .gguf")
        return [by_name[source.file]] + licence
    files = [s for s in siblings if "/" not in s.rfilename
             and any(fnmatch.fnmatch(s.rfilename, p) for p in CHECKPOINT_FILES)
             and not any(fnmatch.fnmatch(s.rfilename, p) for p in SKIP_FILES)]
    if not any(s.rfilename.endswith(".safetensors") for s in files) or "config.json" not in by_name:
        ggufs = sorted(n for n in by_name if n.endswith(".gguf"))
        if ggufs:
            raise StoreError(f"{source.repo} has no safetensors checkpoint; name one of its GGUF files: "
                             + ", ".join(f"hf.co/{source.repo}:{g}" for g in ggufs))
        raise StoreError(f"{source.repo} has no config.json + .safetensors checkpoint and no .gguf file: "
                         "nothing pocketlm can run")
    return sorted(files, key=lambda s: (s.rfilename != "config.json", s.rfilename))


def _size(s) -> int:
    if s.size is not None:
        return int(s.size)
    return int(s.lfs.size) if s.lfs is not None else 0


def _git_blob_sha1(path: Path) -> str:
    h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()




def _digest(path: Path, sibling) -> tuple[bool, str, str, str]:
    """(matches, kind, expected, actual) of a file against the hub's record of it."""
    expected_size = _size(sibling)
    actual_size = path.stat().st_size
    if sibling.lfs is not None and sibling.lfs.sha256:
        kind, expected, actual = "sha256", sibling.lfs.sha256, sha256_file(path)
    elif sibling.blob_id:
        kind, expected, actual = "git-sha1", sibling.blob_id, _git_blob_sha1(path)
    else:
        kind, expected, actual = "size", str(expected_size), str(actual_size)
    return actual == expected and not (expected_size and actual_size != expected_size), kind, expected, actual


def verify(path: Path, sibling) -> str:
    """Check a downloaded file against the hub's record of it; returns "sha256:..." or "git-sha1:...".
    Deletes the file and raises StoreError on a mismatch (so the next pull downloads it again)."""
    ok, kind, expected, actual = _digest(path, sibling)
    expected_size, actual_size = _size(sibling), path.stat().st_size
    if not ok:
        path.unlink(missing_ok=True)
        raise StoreError(f"{sibling.rfilename}: the downloaded file does not match the hub's {kind} (expected "
                         f"{expected}, got {actual}; {actual_size} of {expected_size} bytes); it was deleted. "
                         "Run `pocketlm pull` again to download it afresh")
    return f"{kind}:{expected}"


def _record(sibling) -> str:
    """The hash the manifest records for a verified file."""
    if sibling.lfs is not None and sibling.lfs.sha256:
        return f"sha256:{sibling.lfs.sha256}"
    return f"git-sha1:{sibling.blob_id}" if sibling.blob_id else f"size:{_size(sibling)}"


def _part_path(staging: Path, sibling) -> Path:
    """Where the bytes of `sibling` accumulate until it is complete; named after its hash, so a file that changed
    on the hub starts over instead of being appended to."""
    etag = (sibling.lfs.sha256 if sibling.lfs is not None else sibling.blob_id) or "unknown"
    return staging / ".parts" / f"{quote(sibling.rfilename, safe='')}.{etag}.part"


def _present(staging: Path, sibling) -> int:
    """Bytes of `sibling` already in the staging folder (complete, or a .part of an interrupted pull)."""
    f = staging / WEIGHTS_DIR / sibling.rfilename
    if f.is_file():
        return f.stat().st_size
    part = _part_path(staging, sibling)
    return part.stat().st_size if part.is_file() else 0


def download(repo: str, sibling, revision: str, staging: Path, *, endpoint: str, token: str | None) -> Path:
    """Fetch one file of `repo` into `staging/model/`, resuming its .part file; returns the verified path."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    dest = staging / WEIGHTS_DIR / sibling.rfilename
    if dest.is_file():
        if _digest(dest, sibling)[0]:
            return dest  # completed by an earlier, interrupted pull
        dest.unlink()
    url = hf_hub_url(repo, sibling.rfilename, revision=revision, endpoint=endpoint)
    try:
        meta = get_hf_file_metadata(url, token=token, timeout=TIMEOUT_S)  # HEAD: gated, missing, redirect
    except Exception as e:  # noqa: BLE001 - every hub failure becomes one typed error
        raise _hub_error(e, repo, endpoint, sibling.rfilename) from None
    size = meta.size if meta.size is not None else _size(sibling)
    part = _part_path(staging, sibling)
    part.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.is_file() else 0
    if have > size:  # cannot be a prefix of this file
        part.unlink()
        have = 0
    headers = build_hf_headers(token=token, library_name="pocketlm")
    headers["Accept-Encoding"] = "identity"
    if have < size:
        try:
            with open(part, "ab") as f:
                http_get(meta.location, f, resume_size=have, headers=headers, expected_size=size,
                         displayed_filename=sibling.rfilename)
        except Exception as e:  # noqa: BLE001
            raise _hub_error(e, repo, endpoint, sibling.rfilename) from None
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(part, dest)
    verify(dest, sibling)
    return dest


def check_disk(store: Store, staging: Path, files: list, *, extra: int = 0) -> None:
    """StoreError when the store's file system has less free space than what is still to download + extra."""
    need = sum(max(0, _size(s) - _present(staging, s)) for s in files) + extra
    probe = store.root
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need + DISK_MARGIN:
        raise StoreError(f"not enough free disk space: the download needs {_human(need)} more (and a "
                         f"{_human(DISK_MARGIN)} margin) but {probe} has {_human(free)} free; free some space or set "
                         "POCKETLM_HOME to a larger disk")


def _human(n: int) -> str:
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def pull(name: str, *, store: Store | None = None, force: bool = False, out=None) -> Entry:
    """Download `name` (a tag or hf.co/OWNER/REPO[:FILE]) into the store and return its entry (see the module
    docstring). Pulling a model that is complete at the hub's current commit only checks, unless `force`."""
    out = out if out is not None else sys.stderr
    store = store or Store()
    name = canonical(name)
    source = source_for(name)
    if source.unsupported:
        raise StoreError(f"{name} ({source.repo}): {source.unsupported}; pocketlm does not download a model it "
                         "cannot run")
    endpoint = _endpoint()
    if _offline():
        raise StoreError(f"HF_HUB_OFFLINE is set: `pocketlm pull {name}` needs the hub ({endpoint}); unset it to "
                         "download. Models already in the store run offline")
    store.root.mkdir(parents=True, exist_ok=True)
    with store.lock(name):
        return _pull_locked(name, source, store, endpoint, force, out)


def _pull_locked(name, source, store: Store, endpoint: str, force: bool, out) -> Entry:
    from huggingface_hub import HfApi

    token = os.environ.get("HF_TOKEN") or None
    print(f"pulling {name} from {endpoint}/{source.repo}" + (f" ({source.file})" if source.file else ""), file=out)
    try:
        info = HfApi(endpoint=endpoint, token=token).model_info(source.repo, revision="main", files_metadata=True,
                                                                timeout=TIMEOUT_S)
    except Exception as e:  # noqa: BLE001 - every hub failure becomes one typed error below
        raise _hub_error(e, source.repo, endpoint, "the repository metadata") from None
    files = _select(info.siblings or [], source)
    existing = store.find(name)
    if existing is not None and not force and existing.manifest.get("source", {}).get("revision") == info.sha:
        print(f"{name} is up to date (commit {info.sha[:12]})", file=out)
        return existing
    staging = store.staging(name)
    marker = staging / "revision"
    if marker.is_file() and marker.read_text().strip() != info.sha:  # the hub moved on: a partial pull is stale
        shutil.rmtree(staging)
    (staging / WEIGHTS_DIR).mkdir(parents=True, exist_ok=True)
    marker.write_text(info.sha)
    weights_bytes = sum(_size(s) for s in files if s.rfilename.endswith((".safetensors", ".gguf")))
    check_disk(store, staging, files, extra=weights_bytes // 3 if source.quantize else 0)
    digests = {}
    for s in files:
        path = download(source.repo, s, info.sha, staging, endpoint=endpoint, token=token)
        digests[s.rfilename] = _record(s)
        if s.rfilename == "config.json" and source.file is None:
            _check_runnable(path, source.repo)
    print(f"verified {len(files)} file(s) against the hub's hashes", file=out)
    shutil.rmtree(staging / ".parts", ignore_errors=True)
    if source.quantize:
        _quantize_in_place(staging, source.quantize, out)
    weights = f"{WEIGHTS_DIR}/{source.file}" if source.file else WEIGHTS_DIR
    from pocketlm.store.describe import describe_weights
    manifest = {"weights": weights,
                "source": {"kind": "hub", "endpoint": endpoint, "repo": source.repo, "revision": info.sha,
                           "file": source.file, "quantized_here": source.quantize, "files": digests}}
    try:
        manifest.update(describe_weights(staging / weights))
    except PocketLMError as e:
        raise StoreError(f"{source.repo}: pocketlm cannot run the downloaded model ({e})") from None
    (staging / "revision").unlink()
    entry = store.place(name, staging, manifest)
    print(f"success: {name} ({_human(entry.size)}) in {entry.folder}", file=out)
    return entry


def _check_runnable(config_json: Path, repo: str) -> None:
    from pocketlm import vision
    from pocketlm.config import Phi3Config
    try:
        if vision.is_vision_model(config_json.parent):  # phi-3.5-vision: config.json's text and image halves
            vision.Phi3VConfig.from_folder(config_json.parent)
        else:
            Phi3Config.from_json_file(config_json)
    except PocketLMError as e:
        raise StoreError(f"{repo}: pocketlm cannot run this model ({e}); nothing more was downloaded") from None


def _quantize_in_place(staging: Path, scheme: str, out) -> None:
    """Replace `staging/model` (a float checkpoint) by its `scheme` quantization, made by pocketlm's quantizer."""
    import argparse

    from pocketlm.quant import commands as quant_commands

    src = staging / WEIGHTS_DIR
    dst = staging / f"{WEIGHTS_DIR}.{scheme}"
    shutil.rmtree(dst, ignore_errors=True)
    print(f"quantizing to {scheme} with pocketlm (this takes a while for a 3.8B model) ...", file=out)
    t0 = time.perf_counter()
    quant_commands.run(argparse.Namespace(model=str(src), output=str(dst), scheme=scheme, keep_embeddings=None,
                                          format="safetensors", force=True))
    for f in src.glob("LICENSE*"):
        shutil.copy2(f, dst / f.name)
    shutil.rmtree(src)
    os.replace(dst, src)
    print(f"quantized in {time.perf_counter() - t0:.0f} s", file=out)
