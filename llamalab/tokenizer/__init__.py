"""Tokenizers: SentencePiece BPE (LLaMA's; trained here), byte-level BPE (Llama 3, SmolLM2: tokenizer.json
or tiktoken ranks), chat templates. Both kinds share one interface (``encode(text, bos, eos)``, ``decode``,
``bos_id``, ``eos_id``, ``pad_id``, ``vocab_size``, ``add_bos``, ``stop_ids``, ``save(folder)``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llamalab.tokenizer.bpe import BPETokenizer
from llamalab.tokenizer.spm import Tokenizer, TokenizerTrainConfig, train_tokenizer

__all__ = ["BPETokenizer", "Tokenizer", "TokenizerTrainConfig", "load_folder_tokenizer", "open_tokenizer",
           "train_tokenizer"]


def load_folder_tokenizer(folder: str | Path) -> Tokenizer | BPETokenizer | None:
    """The tokenizer of a model folder (llamalab's or Hugging Face's), its kind read from the files' content.

    ``tokenizer.model`` holding a SentencePiece model -> :class:`Tokenizer` (a Llama 2 HF folder also has a
    tokenizer.json: the SentencePiece model is the original); else ``tokenizer.json`` or a
    ``tokenizer.model`` holding tiktoken ranks (Llama 3's) -> :class:`BPETokenizer`. ``add_bos`` follows
    ``add_bos_token`` in ``tokenizer_config.json`` when it is set. None when the folder has neither file.
    """
    from llamalab.tokenizer.bpe import _read_optional_json, is_tiktoken

    folder = Path(folder)
    model, spec = folder / "tokenizer.model", folder / "tokenizer.json"
    if model.is_file() and not is_tiktoken(model):
        tok = Tokenizer(model)
        flag: Any = _read_optional_json(folder / "tokenizer_config.json").get("add_bos_token")
        if isinstance(flag, bool):
            tok.add_bos = flag and tok.bos_id >= 0
        return tok
    if spec.is_file() or model.is_file():
        return BPETokenizer.from_folder(folder)
    return None


def open_tokenizer(path: str | Path) -> Tokenizer | BPETokenizer:
    """Any tokenizer llamalab reads, from a folder (:func:`load_folder_tokenizer`) or a file: a SentencePiece or
    tiktoken ``tokenizer.model`` (told apart by content) or a ``tokenizer.json``."""
    from llamalab.common import LlamalabError
    from llamalab.tokenizer.bpe import is_tiktoken

    path = Path(path)
    if path.is_dir():
        tok = load_folder_tokenizer(path)
        if tok is None:
            raise LlamalabError(f"{path}: no tokenizer.model or tokenizer.json in the folder")
        return tok
    if not path.exists():
        raise LlamalabError(f"tokenizer file not found: {path}")
    if path.suffix == ".json" or is_tiktoken(path):
        return BPETokenizer(path)
    return Tokenizer(path)
