"""Readers: plain text, JSONL and Parquet files (optionally .gz / .zst / .bz2) -> Documents.

Every document carries an id, its source name and its provenance (file and line, or file and
row), so any token in a shard can be traced back to where it came from.

Plain text: by default one document per file (a book, a source file); ``text_mode="paragraphs"``
splits on blank lines and ``"lines"`` makes every non-empty line a document.

Bad input never vanishes and never ends in a traceback. Each case below raises a
:class:`LlamalabError` naming file and line, or with ``on_error="skip"`` is counted in
``ReadStats.errors`` under its reason:

- ``malformed_json``, ``missing_field:<f>``: a JSONL line that is not a JSON object with a string field;
- ``invalid_utf8``: bytes that are not UTF-8;
- ``lone_surrogate``: a JSON ``"\\ud800"`` escape without its pair (it parses, but is no Unicode text);
- ``binary``: a NUL byte or over 30% control characters in the file's first 8 KiB (an executable,
  an image, a file of zeros);
- ``truncated_file`` / ``unreadable_file``: a ``.gz``/``.bz2``/``.zst`` that ends early or is not one.

``max_doc_bytes`` (0 = no limit) drops a document larger than that (a JSONL line, a text file, a
line or paragraph) as ``too_long`` under either ``on_error``: a size rule, not bad input. Such a
document is never held in memory (lines are read with a bounded ``readline``).
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import re
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from llamalab.common import LlamalabError

TEXT_SUFFIXES = {".txt", ".text", ".md", ".rst", ".py", ".tex", ".xml", ".html"}
BINARY_BLOCK = 8192  # bytes inspected for binary content at the start of each file
MAX_CONTROL_SHARE = 0.3
_CONTROL = bytes(c for c in range(32) if c not in (9, 10, 11, 12, 13)) + b"\x7f"
_MAYBE_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")  # a \uD800-\uDFFF escape in a raw JSON line
_SURROGATE = re.compile("[\ud800-\udfff]")
_READ_ERRORS = (EOFError, OSError, zlib.error)  # truncated / corrupt compressed streams, I/O errors
_DRAIN = 1 << 20


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
    errors: Counter = field(default_factory=Counter)  # reason -> count (on_error="skip", and too_long)
    error_examples: list = field(default_factory=list)

    def add_error(self, reason: str, where: str, limit: int = 20) -> None:
        self.errors[reason] += 1
        if len(self.error_examples) < limit:
            self.error_examples.append(f"{where}: {reason}")

    def to_dict(self) -> dict:
        """What was skipped: counts by reason and the first examples (``file:line: reason``)."""
        return {"files": self.files, "documents": self.documents, "bytes": self.bytes,
                "skipped": dict(sorted(self.errors.items())), "examples": list(self.error_examples)}


def _inner_suffix(path: Path) -> str:
    suffixes = path.suffixes
    if suffixes and suffixes[-1] in (".gz", ".zst", ".bz2"):
        return suffixes[-2] if len(suffixes) > 1 else ""
    return suffixes[-1] if suffixes else ""


def _compression(path: Path) -> str:
    return {".gz": "gzip", ".bz2": "bzip2", ".zst": "zstd"}.get(path.suffix, "")


class _ZstdRaw(io.RawIOBase):
    """A zstd stream (every frame, not only the first) that raises ``EOFError`` when the file ends
    inside a frame: ``zstandard``'s own stream reader returns the truncated data silently.

    Input is fed in small pieces so that one call's output stays small even at extreme ratios."""

    def __init__(self, f: io.BufferedIOBase, piece: int = 4096) -> None:
        import zstandard  # optional extra: llamalab[data]

        self._zstd, self._f, self._piece = zstandard, f, piece
        self._d = zstandard.ZstdDecompressor().decompressobj()
        self._buf, self._pos, self._pending, self._in_frame = b"", 0, b"", False

    def readable(self) -> bool:
        return True

    def _fill(self) -> bool:
        while True:
            data, self._pending = (self._pending or self._f.read(self._piece)), b""
            if not data:
                if self._in_frame:
                    raise EOFError("compressed file ended before the end of a zstd frame")
                return False
            try:
                out = self._d.decompress(data)
            except self._zstd.ZstdError as e:
                raise OSError(f"not zstd data ({e})") from None
            self._in_frame = not self._d.eof
            if self._d.eof:  # the next frame (if any) starts in unused_data
                self._pending = self._d.unused_data
                self._d = self._zstd.ZstdDecompressor().decompressobj()
            if out:
                self._buf, self._pos = out, 0
                return True

    def readinto(self, b) -> int:
        if self._pos >= len(self._buf) and not self._fill():
            return 0
        n = min(len(b), len(self._buf) - self._pos)
        b[:n] = self._buf[self._pos:self._pos + n]
        self._pos += n
        return n

    def close(self) -> None:
        self._f.close()
        super().close()


def open_binary(path: Path) -> io.BufferedIOBase:
    """A buffered binary stream of the file's (decompressed) bytes, with ``peek`` and ``readline``."""
    path = Path(path)
    if not path.exists():
        raise LlamalabError(f"input file not found: {path}")
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    if path.suffix == ".bz2":
        return bz2.open(path, "rb")
    if path.suffix == ".zst":
        return io.BufferedReader(_ZstdRaw(open(path, "rb")), 1 << 16)
    return open(path, "rb")


def binary_reason(block: bytes) -> str | None:
    """Why the first block of a file is not text (a NUL byte, mostly control characters), or None."""
    i = block.find(b"\0")
    if i >= 0:
        return f"NUL byte at offset {i}"
    if block:
        share = (len(block) - len(block.translate(None, _CONTROL))) / len(block)
        if share > MAX_CONTROL_SHARE:
            return f"{share:.0%} control characters in the first {len(block):,} bytes"
    return None


def _skip_or_raise(reason: str, where: str, message: str, on_error: str, stats: ReadStats) -> None:
    if on_error == "skip":
        stats.add_error(reason, where)
        return
    raise LlamalabError(f"{where}: {message}; use on_error=skip to count and skip such input")


def _binary(path: Path, block: bytes, on_error: str, stats: ReadStats) -> bool:
    """True (after counting it, or raising) when the file's first block is binary."""
    why = binary_reason(block)
    if why is None:
        return False
    line = block[: block.find(b"\0") if b"\0" in block else len(block)].count(b"\n") + 1
    _skip_or_raise("binary", f"{path}:{line}", f"binary data, not text ({why})", on_error, stats)
    return True


def _broken(path: Path, lineno: int, e: BaseException, on_error: str, stats: ReadStats) -> None:
    """A stream that failed while reading: truncated or corrupt compression, or an I/O error."""
    kind = _compression(path)
    where = f"{path}:{lineno}" if lineno else str(path)
    if isinstance(e, EOFError):
        msg = f"truncated {kind + ' ' if kind else ''}file: it ends before its data does ({e})"
        _skip_or_raise("truncated_file", where, msg, on_error, stats)
    else:
        msg = f"not a readable {kind + ' ' if kind else ''}file ({e})"
        _skip_or_raise("unreadable_file", where, msg, on_error, stats)


def _decode(raw: bytes, where: str, on_error: str, stats: ReadStats) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        _skip_or_raise("invalid_utf8", where, f"not UTF-8 text ({e.reason} at byte {e.start})", on_error, stats)
        return None


def _readline(f: io.BufferedIOBase, limit: int) -> bytes | int:
    """The next line (with its newline; b"" at the end), or, when it is longer than ``limit``
    bytes (not counting the newline), its length: such a line is read in bounded pieces and dropped."""
    if not limit:
        return f.readline()
    raw = f.readline(limit + 1)
    if len(raw) <= limit or raw.endswith(b"\n"):
        return raw
    n = len(raw)
    while raw and not raw.endswith(b"\n"):
        raw = f.readline(_DRAIN)
        n += len(raw)
    return n


def _too_long(stats: ReadStats, where: str, n: int) -> None:
    stats.bytes += n
    stats.add_error("too_long", where)


def read_text_file(path: Path, source: str, mode: str, on_error: str, stats: ReadStats,
                   max_bytes: int = 0) -> Iterator[Document]:
    lineno = 0
    try:
        with open_binary(path) as f:
            if mode == "file":
                raw = f.read(max_bytes + 1) if max_bytes else f.read()
                if max_bytes and len(raw) > max_bytes:
                    n = len(raw)
                    del raw
                    while chunk := f.read(_DRAIN):
                        n += len(chunk)
                    _too_long(stats, f"{path}:1", n)
                    return
                stats.bytes += len(raw)
                if _binary(path, raw[:BINARY_BLOCK], on_error, stats):
                    return
                text = _decode(raw, f"{path}", on_error, stats)
                del raw
                if text is None:
                    return
                text = text.lstrip("\ufeff")
                if text.strip():
                    yield Document(f"{source}/{path.name}", text, source, f"{path}:1")
                return
            if _binary(path, f.peek(BINARY_BLOCK)[:BINARY_BLOCK], on_error, stats):
                return
            chunk: list[str] = []
            size, start, skipping = 0, 1, False
            while True:
                raw = _readline(f, max_bytes)
                if isinstance(raw, int):  # an over-long line: drop it (in paragraph mode, with its paragraph)
                    lineno += 1
                    stats.bytes += raw
                    if mode == "lines" or not skipping:  # one dropped document, one count
                        stats.add_error("too_long", f"{path}:{start if chunk else lineno}")
                    if mode == "paragraphs":
                        chunk, size, skipping = [], 0, True
                    continue
                if not raw:
                    break
                lineno += 1
                stats.bytes += len(raw)
                line = _decode(raw[:-1] if raw.endswith(b"\n") else raw, f"{path}:{lineno}", on_error, stats)
                if line is None:
                    continue
                line = line.rstrip("\r").lstrip("\ufeff")
                if mode == "lines":
                    if line.strip():
                        yield Document(f"{source}/{path.name}:{lineno}", line, source, f"{path}:{lineno}")
                    continue
                if line.strip():
                    if skipping:
                        continue
                    if not chunk:
                        start = lineno
                    chunk.append(line)
                    size += len(raw)
                    if max_bytes and size > max_bytes:
                        stats.add_error("too_long", f"{path}:{start}")
                        chunk, size, skipping = [], 0, True
                elif chunk or skipping:
                    if chunk:
                        yield Document(f"{source}/{path.name}:{start}", "\n".join(chunk), source, f"{path}:{start}")
                    chunk, size, skipping = [], 0, False
            if chunk:
                yield Document(f"{source}/{path.name}:{start}", "\n".join(chunk), source, f"{path}:{start}")
    except _READ_ERRORS as e:
        _broken(path, lineno + 1 if mode != "file" else 0, e, on_error, stats)


def _lone_surrogate_field(obj) -> str | None:
    """The key (or ``[i]``) of the first string holding a lone UTF-16 surrogate, else None."""
    if isinstance(obj, str):
        return "" if _SURROGATE.search(obj) else None
    if isinstance(obj, dict):
        for k, v in obj.items():
            if _SURROGATE.search(k):
                return k.encode("utf-8", "backslashreplace").decode()
            sub = _lone_surrogate_field(v)
            if sub is not None:
                return f"{k}{'.' + sub if sub and not sub.startswith('[') else sub}"
    if isinstance(obj, list):
        for i, v in enumerate(obj):
            sub = _lone_surrogate_field(v)
            if sub is not None:
                return f"[{i}]{'.' + sub if sub and not sub.startswith('[') else sub}"
    return None


def read_jsonl(path: Path, source: str, text_field: str, on_error: str, stats: ReadStats,
               max_bytes: int = 0) -> Iterator[Document]:
    lineno = 0
    try:
        with open_binary(path) as f:
            if _binary(path, f.peek(BINARY_BLOCK)[:BINARY_BLOCK], on_error, stats):
                return
            while True:
                raw = _readline(f, max_bytes)
                if isinstance(raw, int):
                    lineno += 1
                    _too_long(stats, f"{path}:{lineno}", raw)
                    continue
                if not raw:
                    break
                lineno += 1
                stats.bytes += len(raw)
                where = f"{path}:{lineno}"
                line = _decode(raw, where, on_error, stats)
                if line is None or not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except (ValueError, RecursionError) as e:  # ValueError: also a 5,000-digit integer
                    msg = (f"not valid JSON ({e.msg} at column {e.colno})" if isinstance(e, json.JSONDecodeError)
                           else f"not valid JSON ({str(e).split(';')[0]})" if isinstance(e, ValueError)
                           else "not valid JSON (nested too deeply)")
                    _skip_or_raise("malformed_json", where, msg, on_error, stats)
                    continue
                if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
                    if on_error == "skip":
                        stats.add_error(f"missing_field:{text_field}", where)
                        continue
                    raise LlamalabError(f"{where}: no string field {text_field!r} in this JSON line")
                if _MAYBE_SURROGATE.search(raw):
                    bad = _lone_surrogate_field(obj)
                    if bad is not None:
                        _skip_or_raise("lone_surrogate", where,
                                       f"field {bad!r} holds a lone UTF-16 surrogate (a \\ud800-\\udfff escape "
                                       f"without its pair): not valid Unicode text", on_error, stats)
                        continue
                doc_id = str(obj.get("id", f"{path.name}:{lineno}"))
                meta = {k: v for k, v in obj.items() if k != text_field and isinstance(v, (str, int, float, bool))}
                yield Document(f"{source}/{doc_id}", obj[text_field], source, where, meta)
    except _READ_ERRORS as e:
        _broken(path, lineno + 1, e, on_error, stats)


def read_parquet(path: Path, source: str, text_field: str, on_error: str, stats: ReadStats,
                 max_bytes: int = 0) -> Iterator[Document]:
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
            if max_bytes and len(value) * 4 > max_bytes and len(value.encode("utf-8")) > max_bytes:
                stats.add_error("too_long", f"{path}#{row}")
                continue
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
                   stats: ReadStats | None = None, max_doc_bytes: int = 0) -> Iterator[Document]:
    """Documents from files or folders, by suffix: .jsonl/.json, .parquet, anything else as text.

    ``max_doc_bytes`` > 0 drops larger documents, counted as ``too_long`` in ``stats``."""
    if on_error not in ("raise", "skip"):
        raise LlamalabError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if max_doc_bytes < 0:
        raise LlamalabError(f"max_doc_bytes must be >= 0 (0: no limit), got {max_doc_bytes}")
    stats = stats if stats is not None else ReadStats()
    for path in expand_paths(paths):
        stats.files += 1
        src = source or path.parent.name or "data"
        kind = _inner_suffix(path)
        if kind in (".jsonl", ".json", ".ndjson"):
            it = read_jsonl(path, src, text_field, on_error, stats, max_doc_bytes)
        elif kind == ".parquet":
            it = read_parquet(path, src, text_field, on_error, stats, max_doc_bytes)
        else:
            it = read_text_file(path, src, text_mode, on_error, stats, max_doc_bytes)
        for doc in it:
            stats.documents += 1
            yield doc
