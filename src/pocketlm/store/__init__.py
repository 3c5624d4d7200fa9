"""The local model store: `pocketlm pull/list/show/rm/cp/import/create` and the names `run`, `chat`, `serve`
and `eval` accept (phi3:mini, hf.co/OWNER/REPO[:FILE], or a name given by `import`/`create`/`cp`)."""

from pocketlm.store.registry import ALIASES, TAGS, Source, canonical, source_for
from pocketlm.store.store import Entry, Store, home, resolve

__all__ = ["ALIASES", "TAGS", "Entry", "Source", "Store", "canonical", "home", "resolve", "source_for"]
