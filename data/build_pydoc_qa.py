"""Build the offline demo data: an instruction data set and a pretraining corpus from Python's stdlib.

Everything comes from the standard library of the Python that runs this script, so it needs no
network. The outputs are committed (docstrings differ slightly between Python versions; the
committed files were made with the version recorded in ``data/pydoc_qa.meta.json``).

    python data/build_pydoc_qa.py            # writes data/pydoc_qa.jsonl and data/pydoc_corpus.txt.gz

Outputs
-------
``pydoc_qa.jsonl``
    Alpaca-format records (``instruction``, ``input``, ``output``), three kinds of question about
    public functions and classes of the modules in ``MODULES``:

    * "What does `json.dumps` do?"                       -> first sentence(s) of its docstring
    * "What is the signature of `json.dumps`?"           -> ``json.dumps(obj, *, skipkeys=False, ...)``
    * "Which function ... ?" + the summary as ``input``   -> ``json.dumps``

``pydoc_corpus.txt.gz``
    Plain text for pretraining the demo base model: ``pydoc`` renderings of the same modules plus
    the modules in ``CORPUS_ONLY_MODULES``. The QA eval split is held out of nothing here on
    purpose: like a real pretrained LLM, the base model has read the documentation, and the LoRA
    fine-tune teaches it to answer questions in a chat format.

Docstrings are part of Python, distributed under the PSF License Agreement (see data/README.md).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
import inspect
import io
import json
import platform
import pydoc
import random
import re
import sys
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent

# Modules the questions are about. Chosen to import cleanly, without side effects, on any
# Debian + CPython 3.11 install (no tkinter, no curses, no test suites).
MODULES = [
    "abc",
    "argparse",
    "array",
    "ast",
    "asyncio",
    "base64",
    "binascii",
    "bisect",
    "bz2",
    "calendar",
    "cmath",
    "codecs",
    "collections",
    "colorsys",
    "configparser",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "enum",
    "filecmp",
    "fnmatch",
    "fractions",
    "functools",
    "getopt",
    "gettext",
    "glob",
    "gzip",
    "hashlib",
    "heapq",
    "hmac",
    "html",
    "http.client",
    "imaplib",
    "inspect",
    "io",
    "ipaddress",
    "itertools",
    "json",
    "keyword",
    "linecache",
    "locale",
    "logging",
    "lzma",
    "math",
    "mimetypes",
    "operator",
    "os",
    "os.path",
    "pathlib",
    "pickle",
    "pkgutil",
    "platform",
    "pprint",
    "queue",
    "quopri",
    "random",
    "re",
    "reprlib",
    "sched",
    "secrets",
    "select",
    "shelve",
    "shlex",
    "shutil",
    "signal",
    "smtplib",
    "socket",
    "sqlite3",
    "ssl",
    "stat",
    "statistics",
    "string",
    "struct",
    "subprocess",
    "sys",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "time",
    "timeit",
    "tokenize",
    "traceback",
    "types",
    "typing",
    "unicodedata",
    "urllib.parse",
    "urllib.request",
    "uuid",
    "warnings",
    "weakref",
    "zipfile",
    "zlib",
]
# Extra reading for the base model only.
CORPUS_ONLY_MODULES = [
    "email.message",
    "email.utils",
    "xml.etree.ElementTree",
    "multiprocessing",
    "unittest",
    "doctest",
    "pdb",
    "cProfile",
    "pstats",
    "trace",
    "zipimport",
    "importlib",
    "ftplib",
    "poplib",
    "socketserver",
    "http.server",
    "http.cookies",
    "wsgiref.simple_server",
    "concurrent.futures",
    "optparse",
    "numbers",
    "graphlib",
    "zoneinfo",
    "plistlib",
    "netrc",
    "mailbox",
    "sndhdr",
    "wave",
    "chunk",
    "tomllib",
    "ctypes",
    "dis",
    "codeop",
    "symtable",
    "token",
    "sysconfig",
    "site",
    "fileinput",
    "filecmp",
    "tabnanny",
    "pyclbr",
]

MAX_SUMMARY_CHARS = 220
MAX_SIGNATURE_CHARS = 160


def _summary(doc: str) -> str | None:
    """First paragraph of a docstring, one line, cut at a sentence end when it is long."""
    para = doc.strip().split("\n\n", 1)[0]
    text = " ".join(para.split())
    if len(text) < 12 or text.endswith(":"):
        return None
    if len(text) > MAX_SUMMARY_CHARS:
        cut = [m.end() for m in re.finditer(r"[.!?](\s|$)", text) if m.end() <= MAX_SUMMARY_CHARS]
        if not cut:
            return None
        text = text[: cut[-1]].strip()
    return text


def _members(modname: str):
    """Yield (qualified name, kind, object) for the public functions and classes of a module."""
    mod = importlib.import_module(modname)
    public = getattr(mod, "__all__", None)
    for name, obj in sorted(vars(mod).items()):
        if name.startswith("_") or (public is not None and name not in public):
            continue
        if not (inspect.isfunction(obj) or inspect.isbuiltin(obj) or inspect.isclass(obj)):
            continue
        # Keep what the module defines or re-exports on purpose; skip imported helpers and
        # aliases of builtins (typing.Text is str: its methods are not typing's).
        owner = getattr(obj, "__module__", None) or ""
        if owner == "builtins" and inspect.isclass(obj):
            continue
        foreign = owner.split(".")[0] != modname.split(".")[0] and owner != "builtins"
        private_impl = owner.startswith("_") and owner.lstrip("_") in modname  # e.g. _json for json
        if public is None and foreign and not private_impl:
            continue
        yield f"{modname}.{name}", ("class" if inspect.isclass(obj) else "function"), obj
        if inspect.isclass(obj):
            for mname, meth in sorted(vars(obj).items()):
                if mname.startswith("_") or not callable(meth):
                    continue
                yield f"{modname}.{name}.{mname}", "method", meth


def _signature(qualname: str, obj) -> str | None:
    try:
        sig = str(inspect.signature(obj))
    except (TypeError, ValueError):
        return None
    sig = sig.replace("(self, ", "(").replace("(self)", "()")
    text = f"{qualname}{sig}"
    if len(text) > MAX_SIGNATURE_CHARS or " at 0x" in text:
        return None
    return text


def build_records() -> list[dict]:
    records: list[dict] = []
    seen: set[str] = set()
    for modname in MODULES:
        for qualname, kind, obj in _members(modname):
            if qualname in seen:
                continue
            seen.add(qualname)
            doc = inspect.getdoc(obj) or ""
            summary = _summary(doc)
            if summary:
                records.append(
                    {
                        "instruction": f"What does the {kind} `{qualname}` do?",
                        "input": "",
                        "output": summary,
                        "source": qualname,
                        "kind": "describe",
                    }
                )
                # Reverse question: name the member from its description. Only for summaries
                # that do not contain the member's own name (else the answer is in the prompt).
                short = qualname.rsplit(".", 1)[-1]
                if short.lower() not in summary.lower():
                    records.append(
                        {
                            "instruction": f"Which {kind} in Python's `{modname}` module does this?",
                            "input": summary,
                            "output": f"`{qualname}`",
                            "source": qualname,
                            "kind": "identify",
                        }
                    )
            if kind != "class":
                sig = _signature(qualname, obj)
                if sig:
                    records.append(
                        {
                            "instruction": f"What is the signature of `{qualname}`?",
                            "input": "",
                            "output": f"`{sig}`",
                            "source": qualname,
                            "kind": "signature",
                        }
                    )
    return records


def build_corpus() -> str:
    parts = []
    for modname in sorted(set(MODULES) | set(CORPUS_ONLY_MODULES)):
        try:
            mod = importlib.import_module(modname)
        except ImportError:
            continue
        text = pydoc.render_doc(mod, renderer=pydoc.plaintext)
        # pydoc shows the install path of each module: drop it so the corpus is machine-independent.
        text = re.sub(r"\nFILE\n    .*\n", "\n", text)
        text = re.sub(r"\nMODULE REFERENCE\n(    .*\n)+", "\n", text)
        # Default values such as <object object at 0x7f...> differ on every run.
        text = re.sub(r"( at 0x|, handle )[0-9a-f]+", "", text)
        parts.append(text)
    return "\n\n".join(parts)


def main() -> None:
    warnings.simplefilter("ignore")
    records = build_records()
    # A fixed shuffle so that file order mixes modules and question kinds; the pipeline's own
    # seeded split (data.eval_fraction, data.seed) then takes the eval set.
    random.Random(20261129).shuffle(records)
    out = HERE / "pydoc_qa.jsonl"
    with out.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")

    corpus = build_corpus()
    buf = io.BytesIO()
    # mtime=0 keeps the gzip bytes reproducible.
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz:
        gz.write(corpus.encode("utf-8"))
    (HERE / "pydoc_corpus.txt.gz").write_bytes(buf.getvalue())

    kinds: dict[str, int] = {}
    for r in records:
        kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
    meta = {
        "python": platform.python_version(),
        "implementation": sys.implementation.name,
        "records": len(records),
        "records_by_kind": kinds,
        "modules": len(MODULES),
        "corpus_chars": len(corpus),
        "qa_sha256": hashlib.sha256(out.read_bytes()).hexdigest(),
        "corpus_sha256": hashlib.sha256(corpus.encode("utf-8")).hexdigest(),
    }
    (HERE / "pydoc_qa.meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
