"""Encode text with any tokenizer llamalab reads (SentencePiece, tokenizer.json, tiktoken ranks) and print ids
and pieces (a quick look at a tokenizer)."""

from __future__ import annotations

from dataclasses import dataclass, field

from llamalab.tokenizer import open_tokenizer


@dataclass
class Config:
    tokenizer: str = field(default="", metadata={"positional": True,
                                                 "help": "tokenizer.model, tokenizer.json or a folder holding one"})
    text: str = field(default="", metadata={"help": "text to encode"})
    bos: bool = False


def main(cfg: Config) -> list[int]:
    tok = open_tokenizer(cfg.tokenizer)
    ids = tok.encode(cfg.text, bos=cfg.bos)
    print(ids)
    print([tok.id_to_piece(i) for i in ids])
    print(f"{len(ids)} tokens, {len(cfg.text.encode('utf-8')) / max(len(ids), 1):.2f} bytes/token")
    return ids


if __name__ == "__main__":
    from llamalab.cli import stage_main

    stage_main(Config, main)
