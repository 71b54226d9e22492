"""What an SFT run leaves behind, once its steps are done.

- ``model/``: a llamalab model folder with LoRA merged, ``chat_template`` recorded and the base's
  tokenizer written by its own kind (:func:`llamalab.model.folder.save_tokenizer`: a SentencePiece
  ``tokenizer.model``, or ``tokenizer.json`` + ``tokenizer_config.json``), so the engine, ``llamalab
  generate|chat|serve`` and the HF/GGUF exporters read it like any other;
- ``adapter/``: with LoRA, the adapter alone (it stays separable; the merged model does not);
- ``sft_summary.json`` and ``report.html``.

Under FSDP the trained weights are shards: :func:`gather_plain` is a collective that rebuilds a
plain CPU model on rank 0 (LoRA kept unmerged, so the adapter can be saved before merging).
A run stopped early (``--stop-after``, ``--max-seconds``) writes no ``model/``: it resumes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from llamalab.common import LlamalabError, is_rank0, print0, sha256_file, write_json_atomic
from llamalab.config import to_dict
from llamalab.finetune.data import SFTLedger
from llamalab.finetune.lora import LoRAConfig, apply_lora, merge_lora, save_adapter
from llamalab.model.folder import save_model
from llamalab.run_dir import RunDir
from llamalab.train.fsdp import is_sharded

WEIGHTS_FILE = "model.safetensors"  # a llamalab model folder's weights (llamalab.model.folder)


def base_record(base: Path) -> dict[str, Any]:
    """The base model by path and weights sha256 (a .gguf file hashes itself; None when no single file)."""
    weights = base if base.is_file() else base / WEIGHTS_FILE
    return {"path": str(base.resolve()), "weights_sha256": sha256_file(weights) if weights.exists() else None}


def loss_curve(run: RunDir) -> dict[str, Any]:
    """First/last loss and the means of the first and last 10% of the steps in ``metrics.jsonl``."""
    rows = [json.loads(ln) for ln in run.metrics.read_text().splitlines()] if run.metrics.exists() else []
    losses = [r["loss"] for r in rows]
    if not losses:
        return {}
    k = max(1, len(losses) // 10)
    return {"first": losses[0], "last": losses[-1], "first_10pct_mean": sum(losses[:k]) / k,
            "last_10pct_mean": sum(losses[-k:]) / k, "steps": len(losses)}


def gather_plain(model: torch.nn.Module, lora: LoRAConfig) -> torch.nn.Module | None:
    """The FSDP-trained weights as an unsharded CPU model on rank 0 (None elsewhere), LoRA kept
    unmerged. NOTE: a collective: every rank calls it."""
    from llamalab.model.transformer import Transformer
    from llamalab.train.checkpoint import full_model_state

    full = full_model_state(model)
    if not is_rank0():
        return None
    plain = Transformer(model.cfg)
    if lora.rank:
        apply_lora(plain, lora)
    missing, unexpected = plain.load_state_dict(full, strict=False)
    if unexpected or [k for k in missing if k != "output.weight"]:
        raise LlamalabError(f"sft: gathered weights do not fit the model (missing {missing}, unexpected {unexpected})")
    return plain


def finish(run: RunDir, model: torch.nn.Module, *, lora: LoRAConfig, base: Path, data: Sequence[str], fmt: str,
           tokenizer: Any, template: str, base_meta: dict[str, Any], ledger: SFTLedger, result: dict[str, Any],
           seconds: float) -> dict[str, Any]:
    """Write model/ (merged, with the base's tokenizer files) and adapter/, the summary and the report; print the
    end summary."""
    from llamalab.report.html import write_report

    curve = loss_curve(run)
    summary = {**result, "data": ledger.to_json(), "loss_curve": curve, "template": template}
    if result["steps"] < result["planned_steps"]:
        print0(f"sft: stopped at step {result['steps']}/{result['planned_steps']}; continue with --resume "
               f"(no model/ written yet)")
        return summary
    if is_sharded(model):  # a collective: every rank sends its shards, rank 0 rebuilds a plain model
        model = gather_plain(model, lora)
    if not is_rank0():  # every rank trained the same weights; rank 0 writes them
        return summary
    base_info = base_record(base)
    if lora.rank:
        summary["adapter"] = str(save_adapter(run.adapter, model, lora, base_info))
        merge_lora(model)
    extra = {"chat_template": template, "sft": {"base": base_info, "data": [str(p) for p in data], "format": fmt,
                                                "lora": to_dict(lora) if lora.rank else None,
                                                "steps": result["steps"], "loss_curve": curve},
             **{k: base_meta[k] for k in ("tokenizer",) if k in base_meta}}
    summary["model"] = str(save_model(run.model, model.cpu().float(), extra=extra, tokenizer=tokenizer))
    write_json_atomic(run.sft_summary, summary)
    summary["report"] = str(write_report(run.root))
    print0(done_line(summary, ledger, result, curve, seconds))
    return summary


def done_line(summary: dict[str, Any], ledger: SFTLedger, result: dict[str, Any], curve: dict[str, Any],
              seconds: float) -> str:
    lc = (f"loss {curve['first']:.3f} -> {curve['last']:.3f} (mean of first/last 10% of steps "
          f"{curve['first_10pct_mean']:.3f} -> {curve['last_10pct_mean']:.3f})") if curve else "no steps run"
    return (f"sft: done | {ledger.read} records, {ledger.kept} kept, {sum(ledger.dropped.values())} dropped "
            f"{dict(ledger.dropped) or ''} | {ledger.loss_tokens:,} assistant tokens of {ledger.tokens:,} | {lc} | "
            f"{result['steps']} steps in {seconds:.1f}s (~{result['input_tokens_per_s'] or 0:,.0f} input tokens/s, "
            f"{result['tokens_per_s'] or 0:,.0f} trained tokens/s)"
            + (f" | val loss {result['val_loss']:.3f} on {result['val_examples']} examples"
               if result.get("val_loss") else "")
            + f" | model {summary['model']}"
            + (f" | adapter {summary['adapter']}" if "adapter" in summary else "")
            + f" | report {summary['report']}")
