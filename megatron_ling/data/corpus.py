"""The built-in quick-start corpus: real text that exists on any machine with Python.

Source: the Python standard library's own ``.py`` sources (code, comments, docstrings) and its
LICENSE, found through ``sysconfig``. No download, no bundled data. Files are visited in sorted
order, cut at top-level ``def``/``class`` boundaries into documents of ~0.2-4 KB, and the
documents put in a fixed hashed order, so the corpus is deterministic for a given Python
installation (its identity is recorded as a sha256 in the quick-start manifest).

Why this text: it is natural (written by people), plentiful (~15 MB in CPython 3.11), and highly
regular, so a tiny model learns it quickly, which is what a quick start needs to show.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from dataclasses import dataclass
from typing import Iterator

DEFAULT_MAX_BYTES = 4_000_000
MAX_DOC_CHARS = 4_000
MIN_DOC_CHARS = 200

# Directories inside the stdlib that are not the standard library's own prose/code, are
# machine-specific, or are mostly data tables.
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__",
              "encodings", "lib-dynload", "turtledemo", "ensurepip", "pydoc_data"}
_SKIP_PREFIXES = ("config-", "_sysconfigdata")


@dataclass(frozen=True)
class CorpusInfo:
    path: str
    num_documents: int
    num_bytes: int
    sha256: str


def stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def _source_files(root: str) -> list[str]:
    """Sorted relative paths of the stdlib's .py files (plus LICENSE.txt first)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(_SKIP_PREFIXES))
        for f in filenames:
            if f.endswith(".py") and not f.startswith(_SKIP_PREFIXES):
                out.append(os.path.relpath(os.path.join(dirpath, f), root))
    out.sort()
    lic = "LICENSE.txt"
    if os.path.isfile(os.path.join(root, lic)):
        out.insert(0, lic)
    return out


def _split_documents(text: str) -> list[str]:
    """Cut one file into documents at top-level def/class boundaries.

    Pieces are greedily merged up to MAX_DOC_CHARS; a single over-long piece is cut at line
    boundaries. Fragments shorter than MIN_DOC_CHARS are merged into their neighbour.
    """
    lines = text.splitlines(keepends=True)
    pieces: list[str] = []
    cur: list[str] = []
    size = 0
    for line in lines:
        # Start a new piece at a top-level definition, keeping decorators with what they decorate.
        starts_def = line.startswith(("def ", "class ", "async def ", "@"))
        after_decorator = bool(cur) and cur[-1].startswith("@")
        if starts_def and not after_decorator and size >= MIN_DOC_CHARS:
            pieces.append("".join(cur))
            cur, size = [], 0
        cur.append(line)
        size += len(line)
    if cur:
        pieces.append("".join(cur))
    docs: list[str] = []
    buf = ""
    for p in pieces:
        while len(p) > MAX_DOC_CHARS:  # cut over-long pieces at a line boundary
            cut = p.rfind("\n", 0, MAX_DOC_CHARS) + 1 or MAX_DOC_CHARS
            head, p = p[:cut], p[cut:]
            if buf:
                docs.append(buf)
                buf = ""
            docs.append(head)
        if len(buf) + len(p) > MAX_DOC_CHARS and len(buf) >= MIN_DOC_CHARS:
            docs.append(buf)
            buf = ""
        buf += p
    if buf.strip():
        if docs and len(buf) < MIN_DOC_CHARS and len(docs[-1]) + len(buf) <= MAX_DOC_CHARS:
            docs[-1] += buf
        else:
            docs.append(buf)
    return [d for d in docs if d.strip()]


def iter_documents(max_bytes: int = DEFAULT_MAX_BYTES, root: str | None = None) -> Iterator[dict]:
    """Yield {"text", "source"} documents: about max_bytes of text, in a fixed order.

    Files are taken in sorted order until max_bytes; the documents are then ordered by a hash of
    their source name, a fixed pseudo-random order. That matters because megatron's split
    ("98,2,0") takes contiguous document ranges: hashed order makes the validation documents an
    unbiased sample of the corpus instead of its alphabetically last module.
    """
    root = root or stdlib_dir()
    total = 0
    docs: list[dict] = []
    tag = "python%d.%d" % sys.version_info[:2]
    for rel in _source_files(root):
        if total >= max_bytes:
            break
        try:
            with open(os.path.join(root, rel), encoding="utf-8") as f:
                text = f.read()
        except (UnicodeDecodeError, OSError):
            continue  # a few files are not UTF-8; skip rather than guess
        for i, doc in enumerate(_split_documents(text)):
            docs.append({"text": doc, "source": f"{tag}/{rel}#{i}"})
            total += len(doc.encode("utf-8"))
            if total >= max_bytes:
                break
    docs.sort(key=lambda d: hashlib.sha256(d["source"].encode()).hexdigest())
    yield from docs


def write_corpus(path: str, max_bytes: int = DEFAULT_MAX_BYTES, root: str | None = None) -> CorpusInfo:
    """Write the corpus as jsonl (one {"text", "source"} object per line), atomically."""
    tmp = f"{path}.tmp{os.getpid()}"
    h = hashlib.sha256()
    n = nbytes = 0
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for doc in iter_documents(max_bytes, root):
                line = json.dumps(doc, ensure_ascii=False) + "\n"
                f.write(line)
                h.update(line.encode("utf-8"))
                n += 1
                nbytes += len(doc["text"].encode("utf-8"))
        if nbytes < min(max_bytes, 200_000):
            raise RuntimeError(
                f"only {nbytes} bytes of Python standard-library source found under {root or stdlib_dir()}; "
                "this Python ships without its .py sources, so give data.paths (ling-preprocess output) instead"
            )
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return CorpusInfo(path=path, num_documents=n, num_bytes=nbytes, sha256=h.hexdigest())
