"""Convert models: Hugging Face LLaMA <-> llamalab, llamalab -> GGUF, GGUF -> llamalab.

``llamalab convert SRC DST [--to hf|gguf|llamalab]``. The direction is read from the source's
content (:mod:`llamalab.interop.convert`): a HF folder or a .gguf file is imported; a llamalab
folder (or run folder) is exported to ``--to`` (hf by default).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from llamalab.common import LlamalabError, print0


@dataclass
class Config:
    src: str = field(default="", metadata={"positional": True, "help": "source folder (or .gguf file)"})
    dst: str = field(default="", metadata={"positional": True, "help": "destination folder (or .gguf file)"})
    to: str = field(default="auto", metadata={"choices": ["auto", "llamalab", "hf", "gguf"],
                                              "help": "target format; auto: HF->llamalab, llamalab->hf"})
    gguf_type: str = field(default="f16", metadata={"choices": ["f32", "f16", "q8_0", "q4_0", "q4_1"],
                                                    "help": "GGUF tensor type (q4_*: the embedding/head in q8_0)"})


def main(cfg: Config) -> Path:
    from llamalab.interop.convert import convert

    if not cfg.src or not cfg.dst:
        raise LlamalabError("convert needs SRC and DST")
    kind, to, out = convert(cfg.src, cfg.dst, cfg.to, cfg.gguf_type)
    print0(f"convert: {kind} {cfg.src} -> {to} {out}")
    return out


if __name__ == "__main__":
    from llamalab.cli import stage_main

    stage_main(Config, main)
