"""Token shards, their manifest, and the loader that feeds the trainer in a recorded order.

Writing: documents are tokenized (in batches, SentencePiece's threads) as ``BOS ids EOS`` and
appended to flat binary shards (``uint16`` when the vocabulary fits, else ``uint32``) of about
``shard_tokens`` tokens. The manifest records every shard (file, token count, sha256, dtype) and,
for every document, its id, source, provenance and token range, plus the tokenizer's hash.

Long documents: a document over ``piece_chars`` characters is tokenized in pieces cut at a single
space between two words, and each tokenizer call gets at most ``batch_chars`` characters, so memory
follows the piece size, not the document (SentencePiece needs ~40 bytes per input byte: a 200 MB
line used to end in ``std::bad_alloc``). With SentencePiece (pieces never cross a space that follows
a word; the dummy prefix stands for the space dropped at the cut) and byte-level BPE (the space
starts the next piece) the ids equal those of the whole document; :func:`split_for_encoding`
probes which of the two the tokenizer does. Text without such a space for a whole piece (one
giant "word", some scripts) is cut at a newline, else anywhere: then the ids may differ at that
cut, and the manifest counts it (``long_documents.inexact_cuts``).

Validation: with at least ``min_docs_for_doc_split`` documents, whole documents are held out by a
hash of their id (no document is in both splits). A corpus of very few long documents (one book)
is instead split by position: the last ``val_fraction`` of each document's tokens goes to
validation, and the manifest says so.

Reading: the train stream is cut into windows of ``seq_len + 1`` tokens (inputs and shifted
targets) that never cross a shard boundary (a shard's tail shorter than a window is counted as
unused). Windows are visited in a seeded permutation per epoch. Global batch ``b`` is windows
``order[b*B:(b+1)*B]``: the order depends on the seed and the global batch size only, never on the
world size, so a run's record stays true when it is resized. ``batch_windows(b)`` and
``describe_batch(b)`` answer "which shard ranges did batch b read?".
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from llamalab.common import LlamalabError, Progress, read_json, sha256_file, write_json_atomic
from llamalab.data.readers import Document, ReadStats, read_documents
from llamalab.tokenizer import Tokenizer

MANIFEST = "manifest.json"


@dataclass
class ShardWriterConfig:
    shard_tokens: int = 50_000_000
    val_fraction: float = 0.01
    min_docs_for_doc_split: int = 20
    batch_docs: int = 256
    piece_chars: int = 1 << 18  # longer documents are tokenized in pieces of about this many characters
    batch_chars: int = 1 << 20  # characters per tokenizer call (bounds the tokenizer's working memory)


class _ShardSink:
    """Appends token arrays to ``{split}_{k:05d}.bin`` files, rolling over at ``shard_tokens``."""

    def __init__(self, out: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.out, self.split, self.dtype, self.cap = out, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self.f = None
        self.n = 0

    def _open(self) -> None:
        name = f"{self.split}_{len(self.shards):05d}.bin"
        self.f = open(self.out / (name + ".tmp"), "wb")
        self.shards.append({"file": name, "split": self.split, "n_tokens": 0, "documents": []})
        self.n = 0

    def add(self, doc: Document, ids: np.ndarray) -> None:
        if self.f is None or (self.n >= self.cap and self.n > 0):
            self._close()
            self._open()
        cur = self.shards[-1]
        self.f.write(ids.astype(self.dtype).tobytes())
        cur["documents"].append({"id": doc.id, "source": doc.source, "provenance": doc.provenance,
                                 "start": self.n, "end": self.n + len(ids)})
        self.n += len(ids)
        cur["n_tokens"] = self.n

    def _close(self) -> None:
        if self.f is None:
            return
        self.f.close()
        cur = self.shards[-1]
        tmp = self.out / (cur["file"] + ".tmp")
        tmp.replace(self.out / cur["file"])
        cur["sha256"] = sha256_file(self.out / cur["file"])
        self.f = None

    def close(self) -> list[dict]:
        self._close()
        return self.shards


def _is_val(doc_id: str, val_fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha1(doc_id.encode("utf-8")).digest()[:8], "big")
    return (h % 1_000_000) < val_fraction * 1_000_000


def _batched(it: Iterable[Document], n: int) -> Iterator[list[Document]]:
    buf: list[Document] = []
    for d in it:
        buf.append(d)
        if len(buf) == n:
            yield buf
            buf = []
    if buf:
        yield buf


def tokenizer_location(path: str | Path | None, out_dir: str | Path) -> dict[str, str | None]:
    """The manifest's record of where the tokenizer is: its absolute ``path`` and its ``relative_path``
    from the shard folder, so a run started from any folder (or after moving both) finds it."""
    if path is None:
        return {"path": None, "relative_path": None}
    path = Path(path).resolve()
    return {"path": str(path), "relative_path": os.path.relpath(path, Path(out_dir).resolve())}


def space_mode(tokenizer) -> str:
    """How to cut text between two words so that piece-wise ids equal whole-text ids:
    ``"drop"``: the cut's space is left out and the next piece starts at the word (SentencePiece's
    dummy prefix puts the space back); ``"keep"``: the next piece starts with the space (byte-level
    BPE); ``"inexact"``: neither reproduces the probe, cuts keep the space and may change ids."""
    left, right = "the quick brown fox", "jumps over the lazy dog"
    whole = list(tokenizer.encode(f"{left} {right}"))
    if list(tokenizer.encode(left)) + list(tokenizer.encode(right)) == whole:
        return "drop"
    if list(tokenizer.encode(left)) + list(tokenizer.encode(" " + right)) == whole:
        return "keep"
    return "inexact"


def _cut(text: str, lo: int, target: int, hi: int) -> tuple[int, bool]:
    """A cut position in ``text[lo:hi]`` near ``target``: a space between two non-space characters
    (exact), else just after a newline, else ``target`` itself (both inexact)."""
    def between_words(i: int) -> bool:
        return not text[i - 1].isspace() and i + 1 < len(text) and not text[i + 1].isspace()

    i = target
    while (i := text.rfind(" ", lo + 1, i)) >= 0:  # backwards from the target first
        if between_words(i):
            return i, True
    i = target
    while (i := text.find(" ", i + 1, hi)) >= 0:  # then forwards
        if between_words(i):
            return i, True
    nl = text.rfind("\n", lo + 1, hi)
    if nl >= 0:
        return nl + 1, False
    return target, False


def split_for_encoding(text: str, piece_chars: int, mode: str) -> tuple[list[str], int]:
    """``text`` cut into pieces of about ``piece_chars`` characters for piece-wise tokenization
    (see :func:`space_mode`); returns the pieces and the number of inexact cuts."""
    if len(text) <= piece_chars:
        return [text], 0
    pieces, inexact, a = [], 0, 0
    while len(text) - a > piece_chars:
        cut, exact = _cut(text, a, a + piece_chars, min(len(text), a + 2 * piece_chars))
        inexact += not exact or mode == "inexact"
        if exact:
            pieces.append(text[a:cut])
            a = cut + 1 if mode == "drop" else cut
        else:
            pieces.append(text[a:cut])
            a = cut
    pieces.append(text[a:])
    return pieces, inexact


@dataclass
class _LongDocs:
    documents: int = 0
    pieces: int = 0
    inexact_cuts: int = 0


def _encode_texts(tokenizer, texts: list[str], cfg: ShardWriterConfig, mode: str, tally: _LongDocs) -> list[np.ndarray]:
    """``BOS ids EOS`` per text (int32), long texts in pieces, at most ``batch_chars`` per call."""
    parts: list[list[np.ndarray]] = [[] for _ in texts]
    group: list[tuple[int, str]] = []
    size = 0

    def flush() -> None:
        nonlocal group, size
        if group:
            for (i, _), ids in zip(group, tokenizer.encode_batch([p for _, p in group])):
                parts[i].append(np.asarray(ids, dtype=np.int32))
        group, size = [], 0

    for i, text in enumerate(texts):
        pieces, inexact = split_for_encoding(text, cfg.piece_chars, mode)
        if len(pieces) > 1:
            tally.documents += 1
            tally.pieces += len(pieces)
            tally.inexact_cuts += inexact
        for piece in pieces:
            if group and size + len(piece) > cfg.batch_chars:
                flush()
            group.append((i, piece))
            size += len(piece)
        del pieces
    flush()
    bos = [tokenizer.bos_id] if tokenizer.bos_id >= 0 else []
    eos = [tokenizer.eos_id] if tokenizer.eos_id >= 0 else []
    out = []
    for i in range(len(texts)):
        out.append(np.concatenate([np.asarray(bos, dtype=np.int32), *parts[i], np.asarray(eos, dtype=np.int32)]))
        parts[i] = []
    return out


def write_shards(docs: Iterable[Document], tokenizer: Tokenizer, out_dir: str | Path,
                 cfg: ShardWriterConfig | None = None, n_docs_hint: int | None = None,
                 extra: dict | None = None) -> dict:
    """Tokenize ``docs`` into train/val shards under ``out_dir``; returns (and writes) the manifest.

    ``extra`` keys are added to the manifest (``data shard`` records the input it skipped there)."""
    cfg = cfg or ShardWriterConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    docs = list(docs) if n_docs_hint is None else docs
    n_docs = len(docs) if isinstance(docs, list) else n_docs_hint
    if not n_docs:
        raise LlamalabError("no documents to shard: the corpus is empty (check the input paths and filters)")
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32)
    doc_split = n_docs >= cfg.min_docs_for_doc_split
    sinks = {s: _ShardSink(out, s, dtype, cfg.shard_tokens) for s in ("train", "val")}
    sources: Counter = Counter()
    bar = Progress(n_docs, "shard: tokenizing", unit="docs")
    n_bytes = 0
    mode = space_mode(tokenizer)
    long_docs = _LongDocs()
    for batch in _batched(docs, cfg.batch_docs):
        ids_batch = _encode_texts(tokenizer, [d.text for d in batch], cfg, mode, long_docs)
        for doc, arr in zip(batch, ids_batch):
            n_bytes += len(doc.text.encode("utf-8"))
            sources[doc.source] += len(arr)
            if cfg.val_fraction <= 0:
                sinks["train"].add(doc, arr)
            elif doc_split:
                sinks["val" if _is_val(doc.id, cfg.val_fraction) else "train"].add(doc, arr)
            else:
                cut = len(arr) - max(1, int(len(arr) * cfg.val_fraction))
                sinks["train"].add(doc, arr[:cut])
                sinks["val"].add(doc, arr[cut:])
        bar.update(len(batch))
    bar.close()
    shards = sinks["train"].close() + sinks["val"].close()
    n_train = sum(s["n_tokens"] for s in shards if s["split"] == "train")
    n_val = sum(s["n_tokens"] for s in shards if s["split"] == "val")
    if n_train == 0:
        raise LlamalabError("the corpus produced no training tokens (every document went to validation?)")
    manifest = {
        "version": 1, "dtype": dtype.name, "vocab_size": tokenizer.vocab_size,
        "tokenizer": {**tokenizer_location(tokenizer.path, out), "sha256": tokenizer.sha256(),
                      "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id},
        "val_split": ("documents by sha1(id)" if doc_split else "last fraction of each document's tokens")
        if cfg.val_fraction > 0 else "none",
        "val_fraction": cfg.val_fraction, "n_documents": n_docs, "n_bytes": n_bytes,
        "n_tokens": {"train": n_train, "val": n_val}, "tokens_by_source": dict(sources), "shards": shards,
    }
    if long_docs.documents:
        manifest["long_documents"] = {**asdict(long_docs), "piece_chars": cfg.piece_chars, "cut": mode}
    manifest.update(extra or {})
    write_json_atomic(out / MANIFEST, manifest)
    return manifest


def shard_files(inputs: list[str], tokenizer: Tokenizer, out_dir: str | Path, text_field: str = "text",
                text_mode: str = "file", on_error: str = "raise", cfg: ShardWriterConfig | None = None,
                max_doc_bytes: int = 0) -> tuple[dict, ReadStats]:
    """``llamalab data shard``: read files (text / JSONL / Parquet), tokenize them into shards.
    The manifest's ``skipped_input`` records what the reader skipped, by reason, with examples."""
    stats = ReadStats()
    docs = list(read_documents(inputs, text_field=text_field, text_mode=text_mode, on_error=on_error,
                               stats=stats, max_doc_bytes=max_doc_bytes))
    if not docs:
        skipped = ", ".join(f"{k}: {v}" for k, v in sorted(stats.errors.items())) or "nothing"
        raise LlamalabError(f"shard: no documents to shard in {stats.files} input file(s) "
                            f"(skipped: {skipped}); check the input paths")
    extra = {"skipped_input": {"reasons": dict(sorted(stats.errors.items())),
                               "examples": list(stats.error_examples)}}
    return write_shards(docs, tokenizer, out_dir, cfg, extra=extra), stats


def manifest_hash(path: str | Path) -> str:
    return sha256_file(path)


# ----------------------------------------------------------------------------- reading


@dataclass
class Window:
    shard: int  # index into the split's shard list
    start: int  # first token (inputs are [start, start+seq_len), targets shifted by one)


@dataclass
class TokenDataset:
    """The windows of one split of a manifest, and seeded batch order over them."""

    root: Path
    manifest: dict
    split: str
    seq_len: int
    shards: list[dict] = field(init=False)
    windows_per_shard: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.shards = [s for s in self.manifest["shards"] if s["split"] == self.split]
        self.windows_per_shard = [max(0, (s["n_tokens"] - 1) // self.seq_len) for s in self.shards]
        self._offsets = np.cumsum([0] + self.windows_per_shard)
        self._mmaps: dict[int, np.memmap] = {}
        self.dtype = np.dtype(self.manifest["dtype"])

    @classmethod
    def open(cls, path: str | Path, split: str, seq_len: int, verify: bool = False) -> "TokenDataset":
        path = Path(path)
        root = path if path.is_dir() else path.parent
        manifest = read_json(root / MANIFEST, what="data manifest")
        ds = cls(root, manifest, split, seq_len)
        for s in ds.shards:
            f = root / s["file"]
            if not f.exists():
                raise LlamalabError(f"{root / MANIFEST}: shard {s['file']} is missing")
            if f.stat().st_size != s["n_tokens"] * ds.dtype.itemsize:
                raise LlamalabError(f"{f}: size does not match the manifest ({s['n_tokens']} tokens)")
            if verify and sha256_file(f) != s["sha256"]:
                raise LlamalabError(f"{f}: sha256 does not match the manifest")
        return ds

    @property
    def n_windows(self) -> int:
        return int(self._offsets[-1])

    def window(self, i: int) -> Window:
        k = int(np.searchsorted(self._offsets, i, side="right") - 1)
        return Window(k, int(i - self._offsets[k]) * self.seq_len)

    def tokens(self, w: Window) -> np.ndarray:
        if w.shard not in self._mmaps:
            f = self.root / self.shards[w.shard]["file"]
            self._mmaps[w.shard] = np.memmap(f, dtype=self.dtype, mode="r")
        return np.asarray(self._mmaps[w.shard][w.start:w.start + self.seq_len + 1], dtype=np.int64)

    # -- order
    def epoch_order(self, epoch: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng([seed, epoch])
        return rng.permutation(self.n_windows)

    def batch_windows(self, batch_index: int, batch_size: int, seed: int) -> list[int]:
        """Global window indices of global batch ``batch_index`` (epochs roll over seamlessly)."""
        n = self.n_windows
        if n == 0:
            raise LlamalabError(f"the {self.split} split has no window of {self.seq_len + 1} tokens; "
                                f"use a shorter sequence length or more data")
        first = batch_index * batch_size
        out: list[int] = []
        epoch = first // n
        order = self.epoch_order(epoch, seed)
        for g in range(first, first + batch_size):
            if g // n != epoch:
                epoch = g // n
                order = self.epoch_order(epoch, seed)
            out.append(int(order[g % n]))
        return out

    def get_batch(self, windows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        arr = np.stack([self.tokens(self.window(i)) for i in windows])  # (B, T+1)
        t = torch.from_numpy(arr)
        return t[:, :-1], t[:, 1:]

    def describe_window(self, i: int) -> dict:
        """Shard, token range and the documents a window overlaps."""
        w = self.window(i)
        shard = self.shards[w.shard]
        end = w.start + self.seq_len + 1
        docs = [d for d in shard["documents"] if d["start"] < end and d["end"] > w.start]
        return {"window": i, "shard": shard["file"], "start": w.start, "end": end,
                "documents": [{"id": d["id"], "source": d["source"], "provenance": d["provenance"]} for d in docs]}

    def epochs_for(self, n_batches: int, batch_size: int) -> float:
        return n_batches * batch_size / max(self.n_windows, 1)


def val_batches(ds: TokenDataset, batch_size: int, n_batches: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed, deterministic set of validation batches (the first windows, in order)."""
    n = min(ds.n_windows, batch_size * n_batches)
    for i in range(0, n, batch_size):
        yield ds.get_batch(list(range(i, min(i + batch_size, n))))


def tokens_by_source(manifest: dict) -> dict[str, float]:
    total = sum(manifest["tokens_by_source"].values()) or 1
    return {k: v / total for k, v in manifest["tokens_by_source"].items()}


def load_manifest(path: str | Path) -> dict:
    p = Path(path)
    return read_json(p / MANIFEST if p.is_dir() else p, what="data manifest")
