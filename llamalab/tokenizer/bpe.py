"""Byte-level BPE (GPT-2 / Llama-3 style) behind llamalab's tokenizer interface.

LLaMA 1 uses SentencePiece (:mod:`llamalab.tokenizer.spm`); GGUF files and Hugging Face folders of
later models carry a byte-level BPE vocabulary instead, as a ``tokenizer.json`` for the Hugging Face
``tokenizers`` package. This class wraps that package (imported where used: it is an optional
dependency) and exposes the same surface as :class:`llamalab.tokenizer.Tokenizer` (``encode``,
``decode``, ``bos_id``, ``eos_id``, ``pad_id``, ``vocab_size``, piece lookups), so the engine, the
server and the evaluators never ask which kind they hold.

The special ids are not part of the ``tokenizers`` spec, so llamalab keeps them in an extra
top-level ``"llamalab": {"bos_id": .., "eos_id": ..}`` key of the spec, stripped before the spec is
handed to ``tokenizers``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from llamalab.common import LlamalabError


class BPETokenizer:
    """Byte-level BPE from a tokenizer.json (a path) or its parsed spec, with llamalab's interface."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if not path.exists():
            raise LlamalabError(f"tokenizer file not found: {path}")
        try:
            spec = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LlamalabError(f"{path}: not a valid tokenizer.json ({e})") from None
        self._init(spec, path)

    @classmethod
    def from_spec(cls, spec: dict[str, Any] | str) -> BPETokenizer:
        """Build from an in-memory tokenizer.json spec (a dict or its JSON text); ``path`` is None."""
        if isinstance(spec, str):
            spec = json.loads(spec)
        self = cls.__new__(cls)
        self._init(spec, None)
        return self

    def _init(self, spec: dict[str, Any], path: Path | None) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        self.tk = HFTokenizer.from_str(json.dumps({k: v for k, v in spec.items() if k != "llamalab"}))
        ids = spec.get("llamalab", {})
        self.bos_id: int = ids.get("bos_id", -1)
        self.eos_id: int = ids.get("eos_id", -1)
        self.pad_id = -1
        self.unk_id = -1
        self.path = path

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.tk.encode(text, add_special_tokens=False).ids
        if bos and self.bos_id >= 0:
            ids = [self.bos_id] + ids
        if eos and self.eos_id >= 0:
            ids = ids + [self.eos_id]
        return ids

    def encode_batch(self, texts: Sequence[str], bos: bool = False, eos: bool = False) -> list[list[int]]:
        return [self.encode(t, bos=bos, eos=eos) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=True)

    def id_to_piece(self, i: int) -> str:
        return self.tk.id_to_token(int(i)) or ""

    def piece_to_id(self, piece: str) -> int:
        i = self.tk.token_to_id(piece)
        return -1 if i is None else i

    def token_text(self, i: int) -> str:
        return self.tk.decode([int(i)], skip_special_tokens=False)
