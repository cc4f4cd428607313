"""Build the training text for the bundled demo model.

The corpus is the docstrings of this interpreter's Python standard library
(modules, classes, functions and methods), collected with ``inspect.getdoc``
over ``pkgutil.iter_modules`` of the stdlib.  That text comes with every Python
installation and is licensed under the PSF License Version 2
(https://docs.python.org/3/license.html), so the project may redistribute
models trained on it and anyone can rebuild the corpus offline.

The corpus is built at training time and is not committed.  Usage:

    python tools/corpus.py --out corpus.txt   # writes corpus.txt (train) and stats

or from Python: ``build_corpus() -> (train_bytes, heldout_bytes)``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import inspect
import io
import pkgutil
import sys
import sysconfig
import warnings

# Modules that have side effects on import, need a display, or are huge/slow.
SKIP = {
    "antigravity", "this", "idlelib", "turtle", "turtledemo", "tkinter",
    "lib2to3", "ensurepip", "venv", "pydoc_data", "test", "tests",
    "xxsubtype", "xxlimited", "xxlimited_35", "__phello__", "__hello__",
    "_xxtestfuzz", "site", "sitecustomize", "usercustomize", "msilib",
    "winreg", "winsound", "_winapi", "nt", "crypt", "nis", "spwd", "ossaudiodev",
}


def stdlib_module_names() -> list[str]:
    """Top-level public stdlib module names available to this interpreter."""
    names = set(getattr(sys, "stdlib_module_names", ()))
    stdlib_dir = sysconfig.get_paths()["stdlib"]
    for info in pkgutil.iter_modules([stdlib_dir]):
        names.add(info.name)
    for name in sys.builtin_module_names:
        names.add(name)
    return sorted(n for n in names if not n.startswith("_") and n not in SKIP)


def _walk(name: str):
    """Yield the module and its public submodules (packages are walked)."""
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            mod = importlib.import_module(name)
    except BaseException:  # noqa: BLE001 - anything can happen at import time
        return
    yield mod
    path = getattr(mod, "__path__", None)
    if not path:
        return
    for info in pkgutil.iter_modules(path, name + "."):
        last = info.name.rsplit(".", 1)[-1]
        if last.startswith("_") or "test" in last or last in SKIP:
            continue
        yield from _walk(info.name)


def _docs_of(mod):
    """Docstrings of a module and its public classes, functions and methods."""
    seen_objs = set()

    def one(obj):
        if id(obj) in seen_objs:
            return None
        seen_objs.add(id(obj))
        try:
            return inspect.getdoc(obj)
        except Exception:  # noqa: BLE001
            return None

    yield one(mod)
    for attr in sorted(vars(mod)):
        if attr.startswith("_"):
            continue
        obj = vars(mod)[attr]
        if not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        # only objects defined in this module (avoid re-exports)
        if getattr(obj, "__module__", None) not in (mod.__name__, None):
            continue
        yield one(obj)
        if inspect.isclass(obj):
            for mname in sorted(vars(obj)):
                if mname.startswith("_"):
                    continue
                m = vars(obj)[mname]
                if inspect.isroutine(m) or isinstance(m, (property, classmethod, staticmethod)):
                    yield one(getattr(m, "__func__", m))


def _ascii_prose(doc: str) -> bool:
    if len(doc) < 40:
        return False
    non_ascii = sum(1 for ch in doc if ord(ch) > 126 or (ord(ch) < 32 and ch not in "\n\t"))
    if non_ascii > 0.01 * len(doc):
        return False
    letters = sum(ch.isalpha() or ch == " " for ch in doc)
    return letters >= 0.7 * len(doc)


def collect_docs() -> list[str]:
    """All distinct, ASCII-ish stdlib docstrings in a deterministic order."""
    warnings.simplefilter("ignore")
    docs, seen = [], set()
    for name in stdlib_module_names():
        for mod in _walk(name):
            for doc in _docs_of(mod):
                if not doc:
                    continue
                doc = doc.replace("\t", "    ").strip()
                doc = doc.encode("ascii", "ignore").decode("ascii")
                if not _ascii_prose(doc):
                    continue
                key = hashlib.sha1(doc.encode()).hexdigest()
                if key in seen:
                    continue
                seen.add(key)
                docs.append(doc)
    return docs


def build_corpus(heldout_frac: float = 0.05) -> tuple[bytes, bytes]:
    """(train, heldout) bytes.  Every 20th docstring (5%) is held out."""
    docs = collect_docs()
    every = round(1 / heldout_frac)
    train = [d for i, d in enumerate(docs) if i % every != every - 1]
    held = [d for i, d in enumerate(docs) if i % every == every - 1]
    join = lambda ds: ("\n\n".join(ds) + "\n\n").encode("ascii")  # noqa: E731
    return join(train), join(held)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="corpus.txt", help="train text path")
    ap.add_argument("--heldout-out", default=None, help="held-out text path")
    a = ap.parse_args(argv)
    train, held = build_corpus()
    with open(a.out, "wb") as f:
        f.write(train)
    if a.heldout_out:
        with open(a.heldout_out, "wb") as f:
            f.write(held)
    print(f"python {sys.version.split()[0]}: train {len(train)} bytes, held-out {len(held)} bytes")


if __name__ == "__main__":
    main()
