"""SentencePiece tokenizers: LLaMA-style BPE training and loading, and chat templates."""

from llamalab.tokenizer.spm import Tokenizer, TokenizerTrainConfig, train_tokenizer

__all__ = ["Tokenizer", "TokenizerTrainConfig", "train_tokenizer"]
