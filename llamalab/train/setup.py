"""What a training stage settles before its first step: model shape, batch plan, precision, the
parallel model, the loss scaler, the run's tokenizer.

Pretraining uses all of it; SFT shares :func:`autocast_for` (and the loop, the step and the record).
The functions take explicit values rather than a stage's ``Config``, so that library code never
depends on a command module.

Batch plan (LLaMA): the global batch is given in tokens and turned into whole sequences; each rank
runs ``accum`` micro-batches of ``micro`` sequences per step, so the global batch, and with it the
data order and the loss, do not depend on the world size (docs/distributed.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from llamalab.common import LlamalabError, print0, sha256_file
from llamalab.data.shards import TokenDataset
from llamalab.model.config import ModelConfig, get_preset
from llamalab.model.transformer import Transformer
from llamalab.run_dir import RunDir
from llamalab.train.distributed import ParallelConfig, parallelize, resolve_strategy
from llamalab.train.optim import OptimConfig, warmup_steps_for

Autocast = Callable[[], contextlib.AbstractContextManager]  # a factory of autocast contexts
TOKENIZER_FILE = "tokenizer.model"  # the SentencePiece file a run keeps in its tokenizer/ folder


@dataclass
class Plan:
    """Everything derived from the config before training starts."""

    model_cfg: ModelConfig
    seq_len: int
    global_seqs: int  # sequences per optimizer step, all ranks together
    micro: int  # sequences per forward pass per rank
    accum: int  # micro-batches per step per rank
    steps: int
    warmup: int
    peak_lr: float


def build_model_config(preset: str, overrides: dict[str, Any], vocab_size: int) -> ModelConfig:
    """The preset's model with ``overrides`` (field -> value) applied and the data's vocabulary size."""
    fields = dataclasses.asdict(get_preset(preset).model)
    unknown = set(overrides) - set(fields)
    if unknown:
        raise LlamalabError(f"model: unknown field(s) {sorted(unknown)}")
    fields.update(overrides)
    fields["vocab_size"] = vocab_size
    return ModelConfig(**fields)


def resolve_seq_len(seq_len: int, model_cfg: ModelConfig) -> int:
    """``seq_len``, or the model's context when 0; never longer than the context."""
    seq_len = seq_len or model_cfg.max_seq_len
    if seq_len > model_cfg.max_seq_len:
        raise LlamalabError(f"seq_len ({seq_len}) is longer than the model's context model.max_seq_len "
                            f"({model_cfg.max_seq_len})")
    return seq_len


def make_plan(train: TokenDataset, model_cfg: ModelConfig, world: int, *, preset: str, global_batch_tokens: int = 0,
              micro_batch_size: int = 0, steps: int = 0, optim: OptimConfig | None = None) -> Plan:
    """Batch sizes, steps, warmup and peak LR over ``world`` data-parallel ranks (0 = the preset's / auto)."""
    optim = optim or OptimConfig()
    seq_len = train.seq_len
    spec = get_preset(preset)
    tokens = global_batch_tokens or spec.batch_tokens
    global_seqs = max(1, tokens // seq_len)
    micro = micro_batch_size
    if micro == 0:
        per_rank = max(1, global_seqs // world)
        micro = max(d for d in range(1, min(16, per_rank) + 1) if per_rank % d == 0)
    if global_seqs % (world * micro) != 0:
        raise LlamalabError(f"global batch of {global_seqs} sequences ({tokens} tokens / seq_len {seq_len}) does not "
                            f"divide by world size {world} x micro_batch_size {micro}")
    steps = steps or max(1, train.n_windows // global_seqs)
    return Plan(model_cfg, seq_len, global_seqs, micro, global_seqs // (world * micro), steps,
                warmup_steps_for(optim, steps), optim.lr or spec.peak_lr)


def autocast_for(device: torch.device, dtype: torch.dtype) -> Autocast:
    """A factory of autocast contexts for ``dtype`` on ``device`` (a no-op context for fp32)."""
    if dtype == torch.float32:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=dtype)


def build_parallel_model(model_cfg: ModelConfig, pcfg: ParallelConfig, device: torch.device, dtype: torch.dtype,
                         seed: int, world: int) -> tuple[torch.nn.Module, Autocast]:
    """The model, initialised with ``seed`` and wrapped for ``pcfg``; and the autocast to train it under.

    FSDP builds on the meta device, shards, then draws each rank's slices (same weights as an
    unsharded init); on GPU its mixed-precision policy replaces autocast (bf16/fp16 all-gathers,
    fp32 gradient reduction). DDP and single-process runs build the full model and use autocast.
    """
    strategy = resolve_strategy(pcfg, world)
    if strategy == "fsdp":
        from llamalab.train.fsdp import init_sharded_weights

        with torch.device("meta"):
            model = Transformer(model_cfg)
        mp = device.type == "cuda" and dtype != torch.float32
        model = parallelize(model, pcfg, device, param_dtype=dtype if mp else None)
        init_sharded_weights(model, device, seed)
        return model, (contextlib.nullcontext if mp else autocast_for(device, dtype))
    model = Transformer(model_cfg)
    model.init_weights(seed=seed)
    model.to(device)
    return parallelize(model, pcfg, device), autocast_for(device, dtype)


def make_grad_scaler(device: torch.device, dtype: torch.dtype, strategy: str) -> torch.amp.GradScaler | None:
    """fp16 only: dynamic loss scaling (OPT); sharded runs agree on overflows across ranks."""
    if dtype != torch.float16:
        return None
    if strategy == "fsdp":
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(device.type)
    return torch.amp.GradScaler(device.type)


def find_tokenizer(manifest: dict[str, Any], data_root: str | Path | None = None) -> Path | None:
    """The tokenizer file the shards were made with: the manifest's absolute ``path``, else its
    ``relative_path`` from the shard folder, else a file of that name in the shard folder; the first
    whose sha256 matches the manifest's. None when none exists; an error when only other files exist."""
    tok = manifest.get("tokenizer") or {}
    want = tok.get("sha256")
    candidates: list[Path] = []
    if tok.get("path"):
        candidates.append(Path(tok["path"]))
    if data_root is not None:
        root = Path(data_root)
        if tok.get("relative_path"):
            candidates.append(root / tok["relative_path"])
        if tok.get("path"):
            candidates.append(root / Path(tok["path"]).name)
    mismatched = []
    for c in dict.fromkeys(candidates):  # in order, each once
        if not c.is_file():
            continue
        if want is None or sha256_file(c) == want:
            return c
        mismatched.append(str(c))
    if mismatched:
        raise LlamalabError(f"{', '.join(mismatched)}: tokenizer differs from the one the shards were made with "
                            f"(sha256 {want})")
    return None


def copy_tokenizer(run: RunDir, manifest: dict[str, Any], stage: str = "pretrain",
                   data_root: str | Path | None = None) -> Path | None:
    """Copy the tokenizer the shards were made with into the run (:func:`find_tokenizer`, checked
    against the manifest's sha256); None, with a warning, when the file the manifest names is gone."""
    dst = run.tokenizer_dir / TOKENIZER_FILE
    if dst.exists():
        return dst
    src = find_tokenizer(manifest, data_root)
    if src is None:
        tok = manifest.get("tokenizer") or {}
        print0(f"{stage}: tokenizer {tok.get('path')} named by the manifest is not found (nor "
               f"{tok.get('relative_path') or 'a copy'} from {data_root or 'the shard folder'}); "
               f"checkpoints will not carry it")
        return None
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return dst
