"""Tokenize documents (text / JSONL / Parquet files or folders) into token shards with a manifest."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from llamalab.common import print0
from llamalab.data.shards import MANIFEST, ShardWriterConfig, shard_files
from llamalab.tokenizer import Tokenizer


@dataclass
class Config:
    inputs: list[str] = field(default_factory=list, metadata={"positional": True,
                                                              "help": "files or folders, comma-separated"})
    tokenizer: str = field(default="", metadata={"help": "tokenizer.model (or its folder)"})
    output: str = field(default="shards", metadata={"help": "output folder (shards + manifest.json)"})
    text_field: str = field(default="text", metadata={"help": "JSONL/Parquet field holding the text"})
    text_mode: str = field(default="file", metadata={"choices": ["file", "paragraphs", "lines"],
                                                     "help": "plain text: one document per file, paragraph or line"})
    on_error: str = field(default="raise", metadata={"choices": ["raise", "skip"],
                                                     "help": "bad input: stop with file:line, or count and skip"})
    max_doc_bytes: int = field(default=0, metadata={"help": "skip documents larger than this (0: no limit); "
                                                            "long ones are tokenized in pieces either way"})
    shard_tokens: int = 50_000_000
    val_fraction: float = 0.01


def main(cfg: Config) -> dict:
    tok = Tokenizer(cfg.tokenizer)
    manifest, stats = shard_files(cfg.inputs, tok, cfg.output, cfg.text_field, cfg.text_mode, cfg.on_error,
                                  ShardWriterConfig(cfg.shard_tokens, cfg.val_fraction), cfg.max_doc_bytes)
    errors = ", ".join(f"{k}: {v}" for k, v in sorted(stats.errors.items())) or "none"
    print0(f"shard: {stats.files} files, {manifest['n_documents']:,} documents, {stats.bytes / 1e6:.2f} MB -> "
           f"{manifest['n_tokens']['train']:,} train + {manifest['n_tokens']['val']:,} val tokens in "
           f"{len(manifest['shards'])} shards ({manifest['dtype']}) at {Path(cfg.output) / MANIFEST} | "
           f"skipped input: {errors}")
    return manifest


if __name__ == "__main__":
    from llamalab.cli import stage_main

    stage_main(Config, main)
