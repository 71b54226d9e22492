"""SentencePiece BPE, trained and used the LLaMA way.

LLaMA's tokenizer (Touvron et al. 2023a, section 2.1) is SentencePiece BPE with every number split
into single digits and unknown UTF-8 characters falling back to bytes, 32k pieces. Training here
sets exactly those options (``split_digits``, ``byte_fallback``), keeps text un-normalised
(``normalization_rule_name=identity``, whitespace runs kept) so that decode(encode(x)) == x, and
records the special ids (unk 0, BOS 1, EOS 2 as in LLaMA; PAD none by default).

Input larger than memory: lines are streamed from the files and, when ``max_sentences`` is set, a
uniform reservoir sample of that many lines is what SentencePiece sees (memory bounded by the
sample, not the corpus). Training itself runs inside SentencePiece's C++ trainer.
"""

from __future__ import annotations

import gzip
import io
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import sentencepiece as spm

from llamalab.common import LlamalabError, Progress, print0, sha256_file


def with_specials(ids: list[int], bos_id: int, eos_id: int) -> list[int]:
    """``ids`` with BOS in front and EOS at the end, each only when its id is >= 0."""
    return ([bos_id] if bos_id >= 0 else []) + ids + ([eos_id] if eos_id >= 0 else [])


class Tokenizer:
    """A loaded SentencePiece model with LLaMA's conventions (BOS prepended on request).

    ``add_bos`` is the BOS rule prompts follow (``encode(text, bos=tok.add_bos)``): True, as LLaMA's
    tokenizer does, unless the source says otherwise (GGUF ``add_bos_token``, tokenizer_config.json).
    """

    kind = "sentencepiece"

    def __init__(self, model_path: str | Path) -> None:
        path = Path(model_path)
        if path.is_dir():
            path = path / "tokenizer.model"
        if not path.exists():
            raise LlamalabError(f"tokenizer file not found: {path}")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except (RuntimeError, OSError) as e:
            raise LlamalabError(f"{path}: not a valid SentencePiece model ({str(e).splitlines()[0]})") from None
        self.path: Path | None = path
        self._bytes: bytes | None = None
        self._read_ids()

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "<memory>") -> Tokenizer:
        """A tokenizer from a serialized SentencePiece model (e.g. rebuilt from a GGUF vocabulary); ``path`` is None."""
        self = cls.__new__(cls)
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(data)
        except (RuntimeError, OSError) as e:
            raise LlamalabError(f"{where}: not a valid SentencePiece model ({str(e).splitlines()[0]})") from None
        self.path, self._bytes = None, bytes(data)
        self._read_ids()
        return self

    def _read_ids(self) -> None:
        self.n_words = self.sp.vocab_size()
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        self.unk_id: int = self.sp.unk_id()
        self.pad_id: int = self.sp.pad_id()  # -1 when the model has none (LLaMA)
        self.add_bos: bool = self.bos_id >= 0
        self.stop_ids: list[int] = [self.eos_id] if self.eos_id >= 0 else []

    @property
    def vocab_size(self) -> int:
        return self.n_words

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.sp.EncodeAsIds(text)
        if bos and self.bos_id >= 0:
            ids = [self.bos_id] + ids
        if eos and self.eos_id >= 0:
            ids = ids + [self.eos_id]
        return ids

    def encode_batch(self, texts: Sequence[str], bos: bool = False, eos: bool = False,
                     num_threads: int = -1) -> list[list[int]]:
        out = self.sp.Encode(list(texts), out_type=int, num_threads=num_threads)
        return [with_specials(x, self.bos_id if bos else -1, self.eos_id if eos else -1) for x in out]

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.DecodeIds([int(i) for i in ids])

    def decode_batch(self, batch: Sequence[Sequence[int]]) -> list[str]:
        return [self.decode(x) for x in batch]

    def id_to_piece(self, i: int) -> str:
        return self.sp.IdToPiece(int(i))

    def piece_to_id(self, piece: str) -> int:
        return self.sp.PieceToId(piece)

    def token_text(self, i: int) -> str:
        """The text of one token inside a sequence ('\u2581' -> space, byte pieces as their byte)."""
        piece = self.sp.IdToPiece(int(i))
        if self.sp.IsByte(int(i)):
            return bytes([int(piece[3:5], 16)]).decode("utf-8", errors="replace")
        return piece.replace("\u2581", " ")

    def save(self, folder: str | Path) -> list[str]:
        """Write ``tokenizer.model`` into ``folder`` (also for a model rebuilt in memory); returns its name."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "tokenizer.model").write_bytes(self.sp.serialized_model_proto())
        return ["tokenizer.model"]

    def sha256(self) -> str:
        if self.path is None:
            import hashlib

            return hashlib.sha256(self._bytes or b"").hexdigest()
        return sha256_file(self.path)

    def info(self) -> dict:
        return {"path": str(self.path), "kind": self.kind, "vocab_size": self.n_words, "bos_id": self.bos_id,
                "eos_id": self.eos_id, "unk_id": self.unk_id, "pad_id": self.pad_id, "add_bos": self.add_bos,
                "sha256": self.sha256()}


# ----------------------------------------------------------------------------- training


@dataclass
class TokenizerTrainConfig:
    inputs: list[str] = field(default_factory=list, metadata={"positional": True,
                                                              "help": "text files (.txt/.gz), comma-separated"})
    output: str = field(default="tokenizer", metadata={"help": "output folder (tokenizer.model, stats.json)"})
    vocab_size: int = field(default=32000, metadata={"help": "number of pieces (LLaMA: 32000)"})
    character_coverage: float = 0.99995
    max_sentences: int = field(default=2_000_000, metadata={
        "help": "reservoir-sample this many lines when the input is larger (0 = use every line)"})
    max_sentence_length: int = 16384
    heldout_fraction: float = field(default=0.01, metadata={"help": "lines kept out to measure compression"})
    pad_id: int = field(default=-1, metadata={"help": "PAD id (-1: none, as LLaMA)"})
    seed: int = 0
    num_threads: int = 2

    def validate(self) -> None:
        if not self.inputs:
            raise LlamalabError("tokenizer train: no input files given")
        if self.vocab_size < 300:
            raise LlamalabError(f"vocab_size={self.vocab_size}: byte fallback alone needs 259 ids; use >= 300")
        if not 0 <= self.heldout_fraction < 0.5:
            raise LlamalabError(f"heldout_fraction must be in [0, 0.5), got {self.heldout_fraction}")


def _open_binary(path: Path) -> io.BufferedIOBase:
    if not path.exists():
        raise LlamalabError(f"input file not found: {path}")
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def iter_lines(paths: Iterable[str | Path]) -> Iterator[str]:
    """Non-empty lines of the files, streamed; a non-UTF-8 line is an error naming file and line."""
    for p in paths:
        path = Path(p)
        with _open_binary(path) as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise LlamalabError(f"{path}:{lineno}: not UTF-8 text ({e.reason})") from None
                line = line.rstrip("\r\n").lstrip("\ufeff")
                if line.strip():
                    yield line


def _sample_lines(cfg: TokenizerTrainConfig) -> tuple[list[str], list[str], int]:
    """Reservoir-sample training lines; every k-th line goes to the held-out set."""
    rng = random.Random(cfg.seed)
    cap = cfg.max_sentences or None
    train: list[str] = []
    heldout: list[str] = []
    every = int(1 / cfg.heldout_fraction) if cfg.heldout_fraction > 0 else 0
    seen = 0
    bar = Progress(None, "tokenizer: reading", unit="lines")
    for i, line in enumerate(iter_lines(cfg.inputs)):
        bar.update()
        if every and i % every == every - 1:
            if len(heldout) < 20000:
                heldout.append(line)
            continue
        seen += 1
        if cap is None or len(train) < cap:
            train.append(line)
        else:
            j = rng.randrange(seen)
            if j < cap:
                train[j] = line
    bar.close()
    return train, heldout, seen


def train_tokenizer(cfg: TokenizerTrainConfig) -> tuple[Tokenizer, dict]:
    """Train a LLaMA-style SentencePiece BPE model into ``cfg.output``; returns it and its stats."""
    cfg.validate()
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    train, heldout, seen = _sample_lines(cfg)
    if not train:
        raise LlamalabError(f"tokenizer train: the inputs hold no text: {', '.join(cfg.inputs)}")
    t0 = time.perf_counter()
    print0(f"tokenizer: training BPE, vocab {cfg.vocab_size}, on {len(train):,} of {seen:,} lines")
    model_prefix = out / ".spm_training"
    try:
        spm.SentencePieceTrainer.Train(
            sentence_iterator=iter(train), model_prefix=str(model_prefix), model_type="bpe",
            vocab_size=cfg.vocab_size, character_coverage=cfg.character_coverage, split_digits=True,
            byte_fallback=True, allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
            normalization_rule_name="identity", add_dummy_prefix=True, split_by_unicode_script=True,
            split_by_number=True, max_sentence_length=cfg.max_sentence_length, unk_id=0, bos_id=1, eos_id=2,
            pad_id=cfg.pad_id, num_threads=cfg.num_threads, minloglevel=2, train_extremely_large_corpus=False,
            hard_vocab_limit=True, unk_surface=" \u2047 ",
        )
    except RuntimeError as e:
        raise LlamalabError(f"SentencePiece training failed: {str(e).splitlines()[0]}") from None
    Path(f"{model_prefix}.model").replace(out / "tokenizer.model")
    Path(f"{model_prefix}.vocab").replace(out / "tokenizer.vocab")
    tok = Tokenizer(out / "tokenizer.model")
    stats = {**tok.info(), "train_lines": len(train), "lines_seen": seen, "heldout_lines": len(heldout),
             "seconds": round(time.perf_counter() - t0, 2), **compression(tok, heldout)}
    (out / "stats.json").write_text(json.dumps(stats, indent=2))
    return tok, stats


def compression(tok: Tokenizer, texts: Sequence[str]) -> dict:
    """Bytes per token (and characters per token) over ``texts``."""
    if not texts:
        return {"bytes_per_token": None, "chars_per_token": None}
    n_tok = sum(len(x) for x in tok.encode_batch(texts))
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_chars = sum(len(t) for t in texts)
    return {"bytes_per_token": round(n_bytes / max(n_tok, 1), 4), "chars_per_token": round(n_chars / max(n_tok, 1), 4)}
