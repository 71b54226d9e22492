"""Describe data: a clean run's ledger and kept documents, a shard manifest, or raw input files.

``llamalab data stats PATH`` where PATH is a ``llamalab data clean`` output folder (ledger table,
documents and MB kept per source), a ``stats.json`` ledger, a shard folder / ``manifest.json``
(tokens per source, the mixture record), or files/folders of raw documents (documents, MB, words
per source, and with ``--languages`` the language mix of a sample).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llamalab.common import LlamalabError
from llamalab.data.stats import describe_paths


@dataclass
class Config:
    paths: list[str] = field(default_factory=list, metadata={"positional": True,
                                                             "help": "clean output, stats.json, manifest, "
                                                                     "or raw inputs"})
    text_field: str = "text"
    on_error: str = field(default="raise", metadata={"choices": ["raise", "skip"]})
    languages: bool = field(default=False, metadata={"help": "identify the language of up to --sample documents"})
    sample: int = 1000


def main(cfg: Config) -> dict:
    if not cfg.paths:
        raise LlamalabError("stats: give a clean output folder, a stats.json, a manifest or input files")
    return describe_paths(cfg.paths, cfg.text_field, cfg.on_error, cfg.languages, cfg.sample)


if __name__ == "__main__":
    from llamalab.cli import stage_main

    stage_main(Config, main)
