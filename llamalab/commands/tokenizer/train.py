"""Train a LLaMA-style SentencePiece BPE tokenizer (split digits, byte fallback) from text files.

The flags are the library's :class:`llamalab.tokenizer.TokenizerTrainConfig` (the pipeline trains
its tokenizer with the same settings); the training is :func:`llamalab.tokenizer.train_tokenizer`.
"""

from __future__ import annotations

from dataclasses import dataclass

from llamalab.common import print0
from llamalab.tokenizer.spm import TokenizerTrainConfig, train_tokenizer


@dataclass
class Config(TokenizerTrainConfig):
    """``llamalab tokenizer train`` flags: exactly :class:`TokenizerTrainConfig`'s fields and checks."""


def main(cfg: Config) -> dict:
    _, stats = train_tokenizer(cfg)
    print0(f"tokenizer: vocab {stats['vocab_size']:,} | bos={stats['bos_id']} eos={stats['eos_id']} "
           f"pad={stats['pad_id']} | {stats['bytes_per_token']} bytes/token on {stats['heldout_lines']:,} "
           f"held-out lines | {stats['seconds']}s -> {cfg.output}/tokenizer.model")
    return stats


if __name__ == "__main__":
    from llamalab.cli import stage_main

    stage_main(Config, main)
