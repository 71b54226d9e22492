"""Clean raw sources into deduplicated documents, with a ledger of every drop.

``llamalab data clean CONFIG.json`` where the file lists the sources
(``{"sources": [{"name": "web", "kind": "web", "inputs": ["crawl/"]}, ...], "eval_files": [...]}``;
any other key is a setting below, and flags given on the command line win), or for one source
``llamalab data clean --inputs DIR --kind web --source-name web``. Output: ``OUT/docs/<source>/*.jsonl``
(the input of ``llamalab data mix``), ``OUT/stats.json`` (the ledger), ``OUT/rejects/`` with
``--keep-rejects``. Re-running the same command resumes: finished shards are not redone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from llamalab.common import LlamalabError
from llamalab.data.clean.pipeline import (
    KINDS,
    CleanSettings,
    SourceSpec,
    fill_defaults,
    load_clean_config,
    print_summary,
    run_clean,
)
from llamalab.data.executor import EXECUTORS


@dataclass
class Config(CleanSettings):
    """The run's sources and executor; every cleaning setting is inherited from CleanSettings."""

    spec: str = field(default="", metadata={"positional": True, "help": "JSON file: {'sources': [...], settings...}"})
    inputs: list[str] = field(default_factory=list, metadata={"nargs": "+",
                                                              "help": "one source's files/folders (without CONFIG)"})
    kind: str = field(default="text", metadata={"choices": list(KINDS), "help": "cleaner for --inputs"})
    source_name: str = field(default="", metadata={"help": "source name for --inputs (default: the kind)"})
    text_field: str = "text"
    text_mode: str = field(default="file", metadata={"choices": ["file", "paragraphs", "lines"]})
    output: str = field(default="clean", metadata={"help": "output folder"})
    executor: str = field(default="local", metadata={"choices": list(EXECUTORS)})
    workers: int = field(default=1, metadata={"help": "local processes"})


def main(cfg: Config) -> dict:
    if cfg.spec:
        sources, values = load_clean_config(cfg.spec)
        fill_defaults(cfg, values, Config(), cfg.spec)
    elif cfg.inputs:
        sources = [SourceSpec(cfg.source_name or cfg.kind, cfg.kind, list(cfg.inputs), cfg.text_field, cfg.text_mode)]
    else:
        raise LlamalabError("clean: give a CONFIG file or --inputs")
    settings = CleanSettings.pick(cfg)
    t0 = time.perf_counter()
    ledger = run_clean(sources, settings, cfg.output, cfg.executor, cfg.workers)
    print_summary(ledger, time.perf_counter() - t0, Path(cfg.output))
    return ledger.to_dict()


if __name__ == "__main__":
    from llamalab.cli import stage_main

    stage_main(Config, main)
