"""Conversion dispatch: one source (read by content) and a target format -> the right converter.

The source kind comes from :func:`llamalab.model.folder.detect_format` (the same detection the
loader uses): a Hugging Face folder or a .gguf file is imported to a llamalab folder; a llamalab
folder (or a run folder, resolved to its model) is exported to ``hf`` (the default) or ``gguf``.
Conversions between two foreign formats are refused: they go through llamalab format, so each
format has one reader and one writer.
"""

from __future__ import annotations

from pathlib import Path

from llamalab.common import LlamalabError
from llamalab.model.folder import detect_format, resolve_model_path

TARGETS = ("auto", "llamalab", "hf", "gguf")
_KIND = {"llamalab": "llamalab", "run": "llamalab", "huggingface": "hf", "gguf": "gguf"}


def source_kind(src: str | Path) -> str:
    """``"llamalab"`` (a model or run folder), ``"hf"`` or ``"gguf"``."""
    return _KIND[detect_format(src)]


def convert(src: str | Path, dst: str | Path, to: str = "auto", gguf_type: str = "f16") -> tuple[str, str, Path]:
    """Convert ``src`` into ``dst`` -> (source kind, target kind, output path).

    ``to="auto"`` exports a llamalab folder to HF and imports anything else to llamalab.
    """
    if to not in TARGETS:
        raise LlamalabError(f"to: {to!r} is not one of {', '.join(TARGETS)}")
    kind = source_kind(src)
    if kind == "llamalab":
        src = resolve_model_path(src)
    to = to if to != "auto" else ("hf" if kind == "llamalab" else "llamalab")
    if kind == to:
        raise LlamalabError(f"{src} is already in {kind} format")
    if kind == "hf" and to == "llamalab":
        from llamalab.interop.hf import import_hf

        return kind, to, import_hf(src, dst)
    if kind == "llamalab" and to == "hf":
        from llamalab.interop.hf import export_folder

        return kind, to, export_folder(src, dst)
    if kind == "llamalab" and to == "gguf":
        from llamalab.interop.gguf import export_gguf_folder

        return kind, to, export_gguf_folder(src, dst, gguf_type)
    if kind == "gguf" and to == "llamalab":
        from llamalab.interop.gguf import import_gguf

        return kind, to, import_gguf(src, dst)
    raise LlamalabError(f"no converter from {kind} to {to}; convert through llamalab format")
