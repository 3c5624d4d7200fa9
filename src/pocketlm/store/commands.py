"""The store's verbs: `pocketlm pull/list/show/rm/cp/import/create` (registered by `pocketlm.cli`).

    pocketlm pull NAME [--force]        phi3:mini, phi3:mini-q4, phi3.5, ..., hf.co/OWNER/REPO[:FILE]
    pocketlm pull --list                the tags and their repositories
    pocketlm list [--json]              name, size, format, quantization, modified
    pocketlm show NAME [--modelfile | --license | --json]
    pocketlm rm NAME...
    pocketlm cp SRC DST
    pocketlm import PATH --name NAME    a checkpoint folder, .safetensors or .gguf file
    pocketlm create NAME -f Modelfile   FROM + SYSTEM + PARAMETER + LICENSE (see store/modelfile.py)
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from pocketlm.errors import ModelNotFoundError, StoreError


def _store():
    from pocketlm.store.store import Store
    return Store()


def _human(n: float) -> str:
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def _ago(t: float) -> str:
    s = max(0.0, time.time() - t)
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if s >= size:
            n = int(s // size)
            return f"{n} {unit}{'s' if n > 1 else ''} ago"
    return "just now"


# ---- verbs --------------------------------------------------------------------------------------------------------

def cmd_pull(args) -> int:
    """Download a model from the Hugging Face hub into the store (resumable, verified, atomic)."""
    from pocketlm.store.registry import ALIASES, TAGS
    if args.list:
        for tag, src in TAGS.items():
            what = f"{src.repo}" + (f" : {src.file}" if src.file else "") + (f" -> {src.quantize}" if src.quantize
                                                                             else "")
            note = f"  (not runnable: {src.unsupported.split(' is not')[0]})" if src.unsupported else ""
            print(f"{tag:18s} {what:60s} {src.description}{note}")
        print("aliases: " + ", ".join(f"{a} = {t}" for a, t in ALIASES.items()))
        print("any hub repository: hf.co/OWNER/REPO (a safetensors checkpoint) or hf.co/OWNER/REPO:FILE.gguf")
        return 0
    if not args.name:
        raise StoreError("pull: name a model (e.g. `pocketlm pull phi3:mini`); `pocketlm pull --list` shows the tags")
    from pocketlm.store.pull import pull
    pull(args.name, store=_store(), force=args.force)
    return 0


def cmd_list(args) -> int:
    """The models in the store: name, size, format, quantization, when modified."""
    store = _store()
    entries = store.entries()
    if args.json:
        print(json.dumps([{"name": e.name, "size": e.size, "format": e.manifest.get("format"),
                           "quantization": e.manifest.get("quantization"), "modified": e.modified,
                           "path": str(e.weights)} for e in entries], indent=2))
        return 0
    if not entries:
        print(f"no models in {store.root}; `pocketlm pull phi3:mini` fetches one (`pocketlm pull --list` for more)",
              file=sys.stderr)
        return 0
    width = max(len("NAME"), *(len(e.name) for e in entries))
    print(f"{'NAME':{width}s}  {'SIZE':>9s}  {'FORMAT':34s}  {'QUANTIZATION':14s}  MODIFIED")
    for e in entries:
        print(f"{e.name:{width}s}  {_human(e.size):>9s}  {str(e.manifest.get('format')):34s}  "
              f"{str(e.manifest.get('quantization')):14s}  {_ago(e.modified)}")
    return 0


def cmd_show(args) -> int:
    """Architecture, parameters, context, chat format, licence, files and defaults of a model in the store."""
    from pocketlm.store.describe import licence_of
    from pocketlm.store.modelfile import render
    entry = _store().get(args.name)
    m = entry.manifest
    mf = entry.modelfile
    if args.modelfile:
        print(f"# Modelfile of {entry.name}, from `pocketlm show --modelfile`; `pocketlm create NEW -f FILE` builds "
              f"a model from it\n# (made from: {mf.get('from') or _source_text(m)})")
        print(render(mf, from_line=entry.name), end="")
        return 0
    licence = mf.get("license") or licence_of(entry.weights if entry.weights.is_dir() else entry.weights.parent,
                                              entry.weights)
    if args.license:
        print(licence or f"{entry.name}: no licence is recorded")
        return 0
    files = sorted(p for p in (entry.folder / "model").rglob("*") if p.is_file())
    if args.json:
        print(json.dumps(dict(m, path=str(entry.weights), license=licence,
                              files={str(p.relative_to(entry.folder)): p.stat().st_size for p in files}), indent=2))
        return 0
    print(f"  model\n    name              {entry.name}\n    architecture      {m.get('architecture')}\n"
          f"    parameters        {m.get('parameters', 0) / 1e9:.2f}B ({m.get('parameters', 0):,})\n"
          f"    context length    {m.get('context_length')}\n    chat format       {m.get('chat_format')}\n"
          f"    format            {m.get('format')}\n    quantization      {m.get('quantization')}\n"
          f"    source            {_source_text(m)}\n    path              {entry.weights}")
    params = mf.get("parameters") or {}
    if params or mf.get("system"):
        print("\n  defaults (Modelfile)")
        if mf.get("system"):
            print(f"    system            {mf['system'][:200]!r}")
        for k, v in params.items():
            print(f"    {k:17s} {v}")
    print("\n  licence")
    print("    " + ("\n    ".join((licence or "none recorded").strip().splitlines()[:4])))
    print(f"\n  files ({_human(entry.size)})")
    for p in files:
        print(f"    {str(p.relative_to(entry.folder / 'model')):40s} {_human(p.stat().st_size):>9s}")
    return 0


def _source_text(m: dict) -> str:
    s = m.get("source") or {}
    if s.get("kind") == "hub":
        text = f"{s.get('endpoint')}/{s.get('repo')} @ {str(s.get('revision'))[:12]}"
        return text + (f" ({s['file']})" if s.get("file") else "") + (
            f", quantized here to {s['quantized_here']}" if s.get("quantized_here") else "")
    if s.get("kind") == "import":
        return f"imported from {s.get('path')}"
    return m.get("copied_from", "?")


def cmd_rm(args) -> int:
    """Remove models from the store."""
    store = _store()
    for name in args.names:
        entry = store.remove(name)
        print(f"deleted {entry.name}")
    return 0


def cmd_cp(args) -> int:
    """Copy a model in the store to a new name (the weights are hard-linked, not duplicated)."""
    entry = _store().copy(args.src, args.dst)
    print(f"copied {args.src} to {entry.name}")
    return 0


def cmd_import(args) -> int:
    """Add a local checkpoint folder, .safetensors or .gguf file to the store under a name."""
    entry = _store().import_path(args.path, args.name)
    print(f"imported {args.path} as {entry.name} ({entry.manifest.get('format')}, "
          f"{entry.manifest.get('quantization')}, {_human(entry.size)})")
    return 0


def cmd_create(args) -> int:
    """Create a model from a Modelfile: FROM a model, with a SYSTEM message, PARAMETER defaults and a LICENSE."""
    from pocketlm.store import modelfile
    path = Path(args.file)
    if not path.is_file():
        raise StoreError(f"create: Modelfile {str(path)!r} does not exist")
    mf = modelfile.parse(path.read_text(encoding="utf-8"))
    entry = create(args.name, mf, base_dir=path.resolve().parent)
    print(f"created {entry.name} from {mf['from']}")
    return 0


def create(name: str, mf: dict, *, base_dir: Path, store=None):
    """Make `name` from a parsed Modelfile. FROM a store name: its weights (hard-linked) and its defaults, which
    this Modelfile's override; FROM a path (relative to `base_dir`): that folder or file is imported."""
    from pocketlm.store.registry import canonical, is_name
    from pocketlm.store.store import WEIGHTS_DIR, link_tree
    store = store or _store()
    src = mf["from"]
    local = Path(src).expanduser()
    if not local.is_absolute():
        local = base_dir / local
    if local.exists():
        return store.import_path(local, name, modelfile=dict(mf, **{"from": str(local)}))
    if not is_name(src):
        raise StoreError(f"Modelfile FROM {src!r}: neither a model in the store nor an existing path "
                         f"(relative paths are read from {base_dir})")
    base = store.find(src)
    if base is None:
        from pocketlm.store.store import not_found_message
        raise ModelNotFoundError("Modelfile FROM: " + not_found_message(src, store))
    merged = dict(base.modelfile)
    merged["from"] = base.name
    merged["parameters"] = dict(base.modelfile.get("parameters") or {}, **mf["parameters"])
    for key in ("system", "license"):
        if mf.get(key) is not None:
            merged[key] = mf[key]
    name = canonical(name)
    with store.lock(name):
        staged = store.new_staging(name)
        try:
            link_tree(base.folder / WEIGHTS_DIR, staged / WEIGHTS_DIR)
            manifest = {k: v for k, v in base.manifest.items() if k not in ("name", "created", "modified", "version")}
            manifest["modelfile"] = merged
            manifest["copied_from"] = base.name
            return store.place(name, staged, manifest)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise


# ---- registration -------------------------------------------------------------------------------------------------

def register(sub) -> dict:
    """Add the store's verbs to the `pocketlm` subparsers; returns {verb: function}."""
    p = sub.add_parser("pull", help=cmd_pull.__doc__, description=cmd_pull.__doc__)
    p.add_argument("name", metavar="NAME", nargs="?", help="a tag (phi3:mini, phi3.5, phi3:mini-q4, ...) or "
                   "hf.co/OWNER/REPO[:FILE]")
    p.add_argument("--force", action="store_true", help="download again even if the model is up to date")
    p.add_argument("--list", action="store_true", help="list the tags and their repositories")
    p = sub.add_parser("list", aliases=["ls"], help=cmd_list.__doc__, description=cmd_list.__doc__)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p = sub.add_parser("show", help=cmd_show.__doc__, description=cmd_show.__doc__)
    p.add_argument("name", metavar="NAME")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--modelfile", action="store_true", help="print the model's Modelfile")
    g.add_argument("--license", action="store_true", help="print the model's licence")
    g.add_argument("--json", action="store_true", help="machine-readable output")
    p = sub.add_parser("rm", help=cmd_rm.__doc__, description=cmd_rm.__doc__)
    p.add_argument("names", metavar="NAME", nargs="+")
    p = sub.add_parser("cp", help=cmd_cp.__doc__, description=cmd_cp.__doc__)
    p.add_argument("src", metavar="SRC")
    p.add_argument("dst", metavar="DST")
    p = sub.add_parser("import", help=cmd_import.__doc__, description=cmd_import.__doc__)
    p.add_argument("path", metavar="PATH", help="checkpoint folder, .safetensors or .gguf file")
    p.add_argument("--name", required=True, help="the name to give it in the store")
    p = sub.add_parser("create", help=cmd_create.__doc__, description=cmd_create.__doc__)
    p.add_argument("name", metavar="NAME")
    p.add_argument("-f", "--file", default="Modelfile", help="the Modelfile (default ./Modelfile)")
    return {"pull": cmd_pull, "list": cmd_list, "ls": cmd_list, "show": cmd_show, "rm": cmd_rm, "cp": cmd_cp,
            "import": cmd_import, "create": cmd_create}
