"""Tokenizers: SentencePiece BPE (LLaMA's; trained here), byte-level BPE (read from GGUF/HF), chat templates."""

from llamalab.tokenizer.bpe import BPETokenizer
from llamalab.tokenizer.spm import Tokenizer, TokenizerTrainConfig, train_tokenizer

__all__ = ["BPETokenizer", "Tokenizer", "TokenizerTrainConfig", "train_tokenizer"]
