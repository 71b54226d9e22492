"""Package a run as a self-describing, checksummed release bundle (LLM360): model card, final model
(llamalab, HF, GGUF), every checkpoint, data + read order, logs, evaluation, checksums.sha256.

``llamalab release RUN --output DIR [--no-data] [--hf-checkpoints]``; check it with
``llamalab release verify DIR``. Layout: :mod:`llamalab.release.bundle`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from llamalab.common import LlamalabError
from llamalab.release.bundle import build_release


@dataclass
class Config:
    run: str = field(default="", metadata={"positional": True, "help": "the run folder to release"})
    output: str = field(default="", metadata={"help": "the bundle folder to create (new or empty)"})
    no_data: bool = field(default=False, metadata={
        "help": "leave the token shards out (the manifest's hashes and the recipe stay)"})
    hf_checkpoints: bool = field(default=False, metadata={"help": "also export every checkpoint as a HF folder"})
    gguf: bool = field(default=True, metadata={"help": "also write the final model as model.gguf (f16)"})

    def validate(self) -> None:
        if not self.run:
            raise LlamalabError("release: give the run folder (RUN)")
        if not self.output:
            raise LlamalabError("release: give --output DIR, the bundle folder to create")


def main(cfg: Config) -> Path:
    cfg.validate()
    return build_release(cfg.run, cfg.output, include_data=not cfg.no_data, hf_checkpoints=cfg.hf_checkpoints,
                         gguf=cfg.gguf)


if __name__ == "__main__":
    from llamalab.cli import stage_main

    stage_main(Config, main)
