"""Token shards, their manifest, and the loader that feeds the trainer in a recorded order.

Writing: documents are tokenized (in batches, SentencePiece's threads) as ``BOS ids EOS`` and
appended to flat binary shards (``uint16`` when the vocabulary fits, else ``uint32``) of about
``shard_tokens`` tokens. The manifest records every shard (file, token count, sha256, dtype) and,
for every document, its id, source, provenance and token range, plus the tokenizer's hash.

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
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from llamalab.common import LlamalabError, Progress, read_json, sha256_file, write_json_atomic
from llamalab.data.readers import Document
from llamalab.tokenizer import Tokenizer

MANIFEST = "manifest.json"


@dataclass
class ShardWriterConfig:
    shard_tokens: int = 50_000_000
    val_fraction: float = 0.01
    min_docs_for_doc_split: int = 20
    batch_docs: int = 256


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


def write_shards(docs: Iterable[Document], tokenizer: Tokenizer, out_dir: str | Path,
                 cfg: ShardWriterConfig | None = None, n_docs_hint: int | None = None) -> dict:
    """Tokenize ``docs`` into train/val shards under ``out_dir``; returns (and writes) the manifest."""
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
    for batch in _batched(docs, cfg.batch_docs):
        ids_batch = tokenizer.encode_batch([d.text for d in batch], bos=True, eos=True)
        for doc, ids in zip(batch, ids_batch):
            arr = np.asarray(ids, dtype=np.int64)
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
        "tokenizer": {"path": str(tokenizer.path), "sha256": tokenizer.sha256(), "bos_id": tokenizer.bos_id,
                      "eos_id": tokenizer.eos_id},
        "val_split": ("documents by sha1(id)" if doc_split else "last fraction of each document's tokens")
        if cfg.val_fraction > 0 else "none",
        "val_fraction": cfg.val_fraction, "n_documents": n_docs, "n_bytes": n_bytes,
        "n_tokens": {"train": n_train, "val": n_val}, "tokens_by_source": dict(sources), "shards": shards,
    }
    write_json_atomic(out / MANIFEST, manifest)
    return manifest


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
