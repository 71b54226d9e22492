"""Readers: plain text, JSONL and Parquet files (optionally .gz / .zst / .bz2) -> Documents.

Every document carries an id, its source name and its provenance (file and line, or file and
row), so any token in a shard can be traced back to where it came from.

Plain text: by default one document per file (a book, a source file); ``text_mode="paragraphs"``
splits on blank lines and ``"lines"`` makes every non-empty line a document.

Bad input never vanishes: a JSONL line that is not JSON, lacks the text field, or a file that is
not UTF-8 raises a :class:`LlamalabError` naming file and line, or with ``on_error="skip"`` is
counted in ``ReadStats.errors`` by reason.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from llamalab.common import LlamalabError

TEXT_SUFFIXES = {".txt", ".text", ".md", ".rst", ".py", ".tex", ".xml", ".html"}


@dataclass
class Document:
    id: str
    text: str
    source: str
    provenance: str  # "path:line" or "path#row"
    meta: dict = field(default_factory=dict)


@dataclass
class ReadStats:
    files: int = 0
    documents: int = 0
    bytes: int = 0
    errors: Counter = field(default_factory=Counter)  # reason -> count (on_error="skip")
    error_examples: list = field(default_factory=list)

    def add_error(self, reason: str, where: str, limit: int = 20) -> None:
        self.errors[reason] += 1
        if len(self.error_examples) < limit:
            self.error_examples.append(f"{where}: {reason}")


def _inner_suffix(path: Path) -> str:
    suffixes = path.suffixes
    if suffixes and suffixes[-1] in (".gz", ".zst", ".bz2"):
        return suffixes[-2] if len(suffixes) > 1 else ""
    return suffixes[-1] if suffixes else ""


def open_binary(path: Path) -> io.BufferedIOBase:
    if not path.exists():
        raise LlamalabError(f"input file not found: {path}")
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    if path.suffix == ".bz2":
        return bz2.open(path, "rb")
    if path.suffix == ".zst":
        import zstandard  # optional extra: llamalab[data]

        return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"))
    return open(path, "rb")


def _decode(raw: bytes, where: str, on_error: str, stats: ReadStats) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if on_error == "skip":
            stats.add_error("invalid_utf8", where)
            return None
        raise LlamalabError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start}); "
                            f"use on_error=skip to count and skip such input") from None


def read_text_file(path: Path, source: str, mode: str, on_error: str, stats: ReadStats) -> Iterator[Document]:
    with open_binary(path) as f:
        raw = f.read()
    stats.bytes += len(raw)
    if mode == "file":
        text = _decode(raw, f"{path}", on_error, stats)
        if text is None:
            return
        text = text.lstrip("\ufeff")
        if text.strip():
            yield Document(f"{source}/{path.name}", text, source, f"{path}:1")
        return
    chunk: list[str] = []
    start = 1
    for lineno, line_b in enumerate(raw.split(b"\n"), 1):
        line = _decode(line_b, f"{path}:{lineno}", on_error, stats)
        if line is None:
            continue
        line = line.rstrip("\r").lstrip("\ufeff")
        if mode == "lines":
            if line.strip():
                yield Document(f"{source}/{path.name}:{lineno}", line, source, f"{path}:{lineno}")
            continue
        if line.strip():
            if not chunk:
                start = lineno
            chunk.append(line)
        elif chunk:
            yield Document(f"{source}/{path.name}:{start}", "\n".join(chunk), source, f"{path}:{start}")
            chunk = []
    if chunk:
        yield Document(f"{source}/{path.name}:{start}", "\n".join(chunk), source, f"{path}:{start}")


def read_jsonl(path: Path, source: str, text_field: str, on_error: str, stats: ReadStats) -> Iterator[Document]:
    with open_binary(path) as f:
        for lineno, raw in enumerate(f, 1):
            stats.bytes += len(raw)
            where = f"{path}:{lineno}"
            line = _decode(raw, where, on_error, stats)
            if line is None or not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                if on_error == "skip":
                    stats.add_error("malformed_json", where)
                    continue
                raise LlamalabError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); "
                                    f"use on_error=skip to count and skip such lines") from None
            if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
                if on_error == "skip":
                    stats.add_error(f"missing_field:{text_field}", where)
                    continue
                raise LlamalabError(f"{where}: no string field {text_field!r} in this JSON line")
            doc_id = str(obj.get("id", f"{path.name}:{lineno}"))
            meta = {k: v for k, v in obj.items() if k != text_field and isinstance(v, (str, int, float, bool))}
            yield Document(f"{source}/{doc_id}", obj[text_field], source, where, meta)


def read_parquet(path: Path, source: str, text_field: str, on_error: str, stats: ReadStats) -> Iterator[Document]:
    import pyarrow.parquet as pq  # optional extra: llamalab[data]

    try:
        pf = pq.ParquetFile(str(path))
    except Exception as e:  # pyarrow raises several types for a broken file
        raise LlamalabError(f"{path}: not a readable Parquet file ({e})") from None
    if text_field not in pf.schema_arrow.names:
        raise LlamalabError(f"{path}: no column {text_field!r} (columns: {pf.schema_arrow.names})")
    stats.bytes += path.stat().st_size
    row = 0
    for batch in pf.iter_batches(columns=[text_field]):
        for value in batch.column(0).to_pylist():
            row += 1
            if not isinstance(value, str):
                if on_error == "skip":
                    stats.add_error(f"missing_field:{text_field}", f"{path}#{row}")
                    continue
                raise LlamalabError(f"{path}#row {row}: column {text_field!r} is not a string")
            yield Document(f"{source}/{path.name}#{row}", value, source, f"{path}#{row}")


def expand_paths(paths: Iterable[str | Path]) -> list[Path]:
    """Files given directly, and files under given folders (sorted, hidden files skipped)."""
    out: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            out.extend(sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith(".")))
        elif p.exists():
            out.append(p)
        else:
            raise LlamalabError(f"input not found: {p}")
    return out


def read_documents(paths: Iterable[str | Path], source: str | None = None, text_field: str = "text",
                   text_mode: str = "file", on_error: str = "raise",
                   stats: ReadStats | None = None) -> Iterator[Document]:
    """Documents from files or folders, by suffix: .jsonl/.json, .parquet, anything else as text."""
    if on_error not in ("raise", "skip"):
        raise LlamalabError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    stats = stats if stats is not None else ReadStats()
    for path in expand_paths(paths):
        stats.files += 1
        src = source or path.parent.name or "data"
        kind = _inner_suffix(path)
        if kind in (".jsonl", ".json", ".ndjson"):
            it = read_jsonl(path, src, text_field, on_error, stats)
        elif kind == ".parquet":
            it = read_parquet(path, src, text_field, on_error, stats)
        else:
            it = read_text_file(path, src, text_mode, on_error, stats)
        for doc in it:
            stats.documents += 1
            yield doc
