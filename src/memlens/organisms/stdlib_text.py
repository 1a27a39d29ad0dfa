"""Plain English text for the organisms: prose paragraphs of standard-library docstrings.

    texts = stdlib_texts()   # one string per docstring, deduplicated, deterministic

The docstrings are read in a fresh interpreter started with ``-I -S`` (no site-packages, no
environment, no user site), so the result cannot depend on what the calling process imported:
other libraries replace stdlib functions (``import torch`` swaps ``inspect.getfile``) and
attach submodules to stdlib modules, and either changed what an in-process walk read. It still
depends on the Python version, which is therefore part of every organism's cache key.

This file only imports the standard library: it runs as a script in that interpreter.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
import subprocess
import sys
import warnings

STDLIB_MODULES = (
    "abc argparse ast asyncio base64 bdb bisect builtins calendar cmd codecs collections "
    "concurrent.futures configparser contextlib copy csv ctypes dataclasses datetime decimal "
    "difflib dis doctest email email.message email.parser enum filecmp fileinput fnmatch "
    "fractions ftplib functools gettext glob gzip hashlib heapq hmac html html.parser http "
    "http.client http.cookiejar http.server imaplib importlib inspect io ipaddress itertools json "
    "json.decoder keyword linecache locale logging logging.handlers lzma mailbox mimetypes "
    "multiprocessing netrc numbers operator optparse os os.path pathlib pdb pickle pickletools "
    "pkgutil platform plistlib poplib pprint profile pstats queue quopri random re reprlib "
    "sched secrets selectors shelve shlex shutil signal smtplib socket socketserver sqlite3 ssl "
    "stat statistics string struct subprocess symtable sys tabnanny tarfile tempfile textwrap "
    "threading timeit token tokenize trace traceback tracemalloc types typing unittest "
    "unittest.mock urllib.parse urllib.request uuid warnings wave weakref xml.dom.minidom "
    "xml.etree.ElementTree xml.sax zipfile zipimport zlib"
).split()

_CODE_RE = re.compile(r">>>|\.\.\.|[{}\[\]=<>|\\`#@*_]|::|\b[a-z]+_[a-z_]+\b|\w+\(")


def prose_paragraphs(doc: str) -> list[str]:
    """The paragraphs of a docstring that read as English prose (no code, lists or fields):
    ≥ 12 words, capitalised, ending with a full stop, ≥ 93% letters and spaces."""
    out = []
    for block in re.split(r"\n\s*\n", doc):
        lines = block.strip().splitlines()
        if not lines or any(ln.startswith((" ", "\t", "-", "*", ":")) for ln in lines):
            continue
        text = " ".join(ln.strip() for ln in lines)
        if len(text.split()) < 12 or _CODE_RE.search(text) or not text[0].isupper():
            continue
        letters = sum(ch.isalpha() or ch.isspace() for ch in text)
        if letters / len(text) < 0.93 or not text.rstrip().endswith("."):
            continue
        out.append(text)
    return out


def read_docstrings() -> list[str]:
    """Prose of the docstrings of `STDLIB_MODULES`, their public non-module attributes and those
    classes' public members, in this process (see `stdlib_texts` for the isolated version)."""
    seen: set[str] = set()
    texts: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for modname in STDLIB_MODULES:
            try:
                mod = importlib.import_module(modname)
            except Exception:  # noqa: BLE001 — optional stdlib pieces may be missing
                continue
            objs = [mod] + [obj for n in sorted(dir(mod)) if not n.startswith("_")
                            and not inspect.ismodule(obj := getattr(mod, n, None))]
            for obj in objs:
                members = [obj]
                if inspect.isclass(obj) and getattr(obj, "__module__", "") == mod.__name__:
                    members += [v for k, v in sorted(vars(obj).items()) if not k.startswith("_")]
                for m in members:
                    try:
                        doc = inspect.getdoc(m) if m is not None else None
                    except Exception:  # noqa: BLE001
                        doc = None
                    paras = prose_paragraphs(doc) if doc else []
                    key = " ".join(paras)
                    if paras and key not in seen:
                        seen.add(key)
                        texts.append("\n".join(paras))
    return texts


def stdlib_texts() -> list[str]:
    """`read_docstrings` run in a fresh isolated interpreter (same Python): deterministic for a
    Python version, whatever the caller imported."""
    run = subprocess.run([sys.executable, "-I", "-S", __file__], capture_output=True, text=True,
                         encoding="utf-8")
    if run.returncode != 0:
        raise RuntimeError(f"reading stdlib docstrings in {sys.executable} -I -S failed:\n"
                           f"{run.stderr.strip()[-2000:]}")
    return json.loads(run.stdout)


if __name__ == "__main__":
    sys.stdout.reconfigure(encoding="utf-8")
    json.dump(read_docstrings(), sys.stdout)
