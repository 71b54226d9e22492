"""The built-in corpus of ``llamalab run``: real text every Python installation carries.

No download, no hub: Python's documentation topics (``pydoc_data.topics``, the reference manual's
prose, ~0.5 MB of English) and the standard library's own source files (code). Two sources, so the
run's mixture table has something to show, and a corpus large enough (~5 MB) that a tiny model's
validation loss has room to fall far below the unigram entropy.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path
from typing import Iterator

from llamalab.data.readers import Document

# top-level stdlib modules, sorted; only plain .py files (no tests, no vendored packages)
_MAX_FILE_BYTES = 200_000


def python_docs() -> Iterator[Document]:
    import pydoc_data.topics as topics

    for name in sorted(topics.topics):
        text = topics.topics[name].strip()
        if text:
            yield Document(f"python-docs/{name}", text, "python-docs", f"pydoc_data.topics[{name!r}]")


def python_stdlib(max_files: int = 400) -> Iterator[Document]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.stat().st_size <= _MAX_FILE_BYTES)[:max_files]
    for p in files:
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        if text.strip():
            yield Document(f"python-stdlib/{p.name}", text, "python-stdlib", f"{p}:1")


def builtin_corpus() -> list[Document]:
    return list(python_docs()) + list(python_stdlib())
