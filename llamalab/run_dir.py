"""The run folder: the one place that knows its layout (the LLM360 record of a training run).

Every stage that writes or reads a run (pretrain, SFT, eval sweeps, memorization, the report, the
pipeline, ``data which-step``) goes through :class:`RunDir` instead of spelling file names, so the
layout can be read here in one screen and changed in one place::

    runs/<name>/
      meta.json                 resolved config, git SHA, versions, data hashes; history of restarts
      metrics.jsonl             one line per optimizer step (and per evaluation)
      logbook.jsonl             restarts, NaNs, spikes, rollbacks, config changes
      data/manifest.json        the shards and the order the trainer reads them
      tokenizer/tokenizer.model the tokenizer the shards were made with
      checkpoints/step_000100/  training state (model/, optimizer, RNG, data position)
      model/                    the final model folder (SFT; pretraining's newest checkpoint otherwise)
      eval/step_000100/T.json   evaluation results per checkpoint and task; curves, figures
      samples.json, summary.json, report.html

NOTE: the names here are part of the on-disk format that released bundles carry; renaming one
breaks reading older runs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

META = "meta.json"
METRICS = "metrics.jsonl"
LOGBOOK = "logbook.jsonl"
CHECKPOINTS = "checkpoints"
EVAL = "eval"
REPORT = "report.html"
SAMPLES = "samples.json"
SUMMARY = "summary.json"
STEP_RE = re.compile(r"^step_(\d{6,})$")  # a checkpoint (and its eval results) folder name


def step_name(step: int) -> str:
    """``step_000100``: the folder name of the checkpoint after ``step`` optimizer updates."""
    return f"step_{step:06d}"


def list_step_dirs(root: str | Path) -> list[Path]:
    """``step_NNNNNN`` folders directly under ``root``, by step number."""
    root = Path(root)
    if not root.is_dir():
        return []
    steps = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_RE.match(p.name))]
    return [p for _, p in sorted(steps)]


@dataclass(frozen=True)
class RunDir:
    """Paths inside one run folder; creating the object touches nothing on disk."""

    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    def __fspath__(self) -> str:
        return str(self.root)

    def __truediv__(self, name: str) -> Path:
        return self.root / name

    # the record
    @property
    def meta(self) -> Path:
        return self.root / META

    @property
    def metrics(self) -> Path:
        return self.root / METRICS

    @property
    def logbook(self) -> Path:
        return self.root / LOGBOOK

    @property
    def report(self) -> Path:
        return self.root / REPORT

    @property
    def samples(self) -> Path:
        return self.root / SAMPLES

    @property
    def summary(self) -> Path:
        return self.root / SUMMARY

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def sft_data(self) -> Path:
        """SFT: the data ledger (records read, kept, dropped by reason; rows, packing, template)."""
        return self.root / "sft_data.json"

    @property
    def sft_summary(self) -> Path:
        """SFT: the end summary (steps, losses, data, where model/ and adapter/ went)."""
        return self.root / "sft_summary.json"

    # preference tuning: the reward model (llamalab rm) and rejection sampling
    @property
    def preference_data(self) -> Path:
        """Preference tuning: the pair ledger (records read, kept, dropped by reason; train/held-out split)."""
        return self.root / "preference_data.json"

    @property
    def rm_summary(self) -> Path:
        """Reward model: the end summary (steps, held-out accuracy before/after, where model/ went)."""
        return self.root / "rm_summary.json"

    @property
    def rejection_samples(self) -> Path:
        """Rejection sampling: every prompt's K answers with their rewards (JSONL)."""
        return self.root / "samples.jsonl"

    @property
    def rejection_kept(self) -> Path:
        """Rejection sampling: the best answer per prompt as ShareGPT JSONL (``llamalab sft --format sharegpt``)."""
        return self.root / "kept.jsonl"

    @property
    def rejection_summary(self) -> Path:
        """Rejection sampling: counts, rewards and the best-of-K curve."""
        return self.root / "rejection_summary.json"

    @property
    def dpo_reference(self) -> Path:
        """DPO: the reference model's answer log-probs of every pair, computed once (resume reads them back)."""
        return self.root / "dpo_reference.safetensors"

    @property
    def dpo_summary(self) -> Path:
        """DPO: the end summary (steps, held-out accuracy before/after, where model/ and adapter/ went)."""
        return self.root / "dpo_summary.json"

    # recipes (llamalab recipe chat): the chain's record and each step's evaluation
    @property
    def recipe(self) -> Path:
        """Recipe: the steps, their folders, wall times and figures (``llamalab recipe chat``)."""
        return self.root / "recipe.json"

    @property
    def recipe_eval(self) -> Path:
        """Recipe: one step's evaluation (benchmarks, RM accuracy, mean RM score, judge vs the start)."""
        return self.root / "recipe_eval.json"

    # data
    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def manifest(self) -> Path:
        return self.data / "manifest.json"

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / "tokenizer"

    @property
    def corpus(self) -> Path:
        return self.root / "corpus"

    # weights
    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    @property
    def model(self) -> Path:
        """The run's final model folder."""
        return self.root / "model"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / step_name(step)

    def list_checkpoints(self) -> list[Path]:
        """The step folders under ``checkpoints/``, oldest first (by step number, not by name)."""
        return list_step_dirs(self.checkpoints)

    # evaluation
    @property
    def eval(self) -> Path:
        return self.root / EVAL

    def eval_result(self, checkpoint_name: str, task: str) -> Path:
        """``eval/<step_NNNNNN>/<task>.json``."""
        return self.eval / checkpoint_name / f"{task}.json"

    @property
    def eval_figures(self) -> Path:
        """``eval/figures.json``: the figures evaluation wrote, with captions, for the report."""
        return self.eval / "figures.json"

    def eval_file(self, name: str) -> Path:
        """A run-level evaluation file (``curves.json``, ``memorization.json``, a figure)."""
        return self.eval / name

    def is_run(self) -> bool:
        """True when the folder holds a run record (its meta.json, metrics or checkpoints)."""
        return self.meta.exists() or self.metrics.exists() or self.checkpoints.is_dir()
