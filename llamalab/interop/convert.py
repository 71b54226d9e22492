"""Convert model folders: Hugging Face LLaMA <-> llamalab (and GGUF where the gguf extra is installed).

The direction is read from the source folder: a HF folder (config.json with ``architectures``)
is imported; a llamalab folder is exported to ``--to`` (hf by default).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from llamalab.common import LlamalabError, print0, read_json


@dataclass
class Config:
    src: str = field(default="", metadata={"positional": True, "help": "source folder (or .gguf file)"})
    dst: str = field(default="", metadata={"positional": True, "help": "destination folder (or .gguf file)"})
    to: str = field(default="auto", metadata={"choices": ["auto", "llamalab", "hf", "gguf"],
                                              "help": "target format; auto: HF->llamalab, llamalab->hf"})
    gguf_type: str = field(default="f16", metadata={"choices": ["f32", "f16", "q8_0"], "help": "GGUF tensor type"})


def detect(src: Path) -> str:
    if src.suffix == ".gguf" and src.is_file():
        return "gguf"
    if not src.exists():
        raise LlamalabError(f"source not found: {src}")
    meta = read_json(src / "config.json", what="config.json")
    if meta.get("format") == "llamalab":
        return "llamalab"
    if "architectures" in meta or "model_type" in meta:
        return "hf"
    raise LlamalabError(f"{src / 'config.json'}: neither a llamalab nor a Hugging Face model folder")


def main(cfg: Config) -> Path:
    if not cfg.src or not cfg.dst:
        raise LlamalabError("convert needs SRC and DST")
    src, dst = Path(cfg.src), Path(cfg.dst)
    kind = detect(src)
    to = cfg.to if cfg.to != "auto" else ("hf" if kind == "llamalab" else "llamalab")
    if kind == to:
        raise LlamalabError(f"{src} is already in {kind} format")
    if kind == "hf" and to == "llamalab":
        from llamalab.interop.hf import import_hf

        out = import_hf(src, dst)
    elif kind == "llamalab" and to == "hf":
        from llamalab.interop.hf import export_folder

        out = export_folder(src, dst)
    elif kind == "llamalab" and to == "gguf":
        from llamalab.interop.gguf import export_gguf_folder

        out = export_gguf_folder(src, dst, cfg.gguf_type)
    elif kind == "gguf" and to == "llamalab":
        from llamalab.interop.gguf import import_gguf

        out = import_gguf(src, dst)
    else:
        raise LlamalabError(f"no converter from {kind} to {to}; convert through llamalab format")
    print0(f"convert: {kind} {src} -> {to} {out}")
    return out


if __name__ == "__main__":
    from llamalab.cli import stage_main

    stage_main(Config, main)
