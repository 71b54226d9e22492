"""The one training loop: schedule, guards, metrics, checkpoints, resume. Pretraining, SFT and
preference tuning all run it; they differ only in the batches they feed and the loss they use.

A stage builds a model and optimizer, a ``batch(b) -> micro-batches`` function giving this rank's
share of global batch ``b`` (a pure function of ``b``, so the data order is recorded by the batch
index alone), and :class:`LoopSettings`; then calls :meth:`Trainer.restore` (resume from the newest
good checkpoint, if asked) and :meth:`Trainer.fit`.

Guards (``llamalab.train.stability``): a NaN/Inf or spiking loss skips the optimizer step and the
batch, or rolls back to the last checkpoint and never reads that batch again; every event goes to
``logbook.jsonl``. Metrics go to ``metrics.jsonl`` (and TensorBoard when asked), one line per step.

Stopping: ``--stop-after``/``--max-seconds`` and SIGTERM/SIGINT end the loop between two steps with
a checkpoint and a ``stop`` line in the logbook (a signal only sets a flag, so a checkpoint being
written is finished first; a second signal stops at once); a signal then raises
:class:`TrainingInterrupted` (exit status 128 + signal: 143, 130), and ``--resume`` continues bit
for bit. With ``final_model`` (pretraining), a completed schedule publishes the last checkpoint's
model as the run's ``model/``; a stopped one has none, its newest checkpoint is the model.

Starting: leftovers of writes a crash interrupted (``*.tmp-<pid>``) are deleted; a start from
step 0 (fresh, or ``--resume`` with no checkpoint yet) empties ``metrics.jsonl``; ``--resume`` when
every checkpoint fails verification is an error unless ``restart_if_corrupt`` (then the bad ones are
renamed ``step_N.corrupt`` and the run starts over, with a ``restart_from_scratch`` logbook line).

Distributed: every rank runs ``fit`` (losses are all-reduced, so all ranks take the same branch
at every guard); rank 0 writes the record. ``self.model`` may be DDP- or FSDP-wrapped: build the
optimizer after wrapping (FSDP swaps parameters for shards), then ``restore()``, which loads a
checkpoint of any world size. fp16: pass ``scaler`` (a ``GradScaler``); its state is checkpointed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from llamalab.common import LlamalabError, Progress, is_rank0, print0
from llamalab.run_dir import RunDir
from llamalab.train.checkpoint import (
    CORRUPT_SUFFIX,
    TrainState,
    latest_good_checkpoint,
    list_checkpoints,
    load_checkpoint,
    publish_model,
    remove_partial_writes,
    save_checkpoint,
    set_aside,
)
from llamalab.train.distributed import unwrap
from llamalab.train.fsdp import is_sharded
from llamalab.train.optim import lr_at, set_lr
from llamalab.train.stability import GuardConfig, Logbook, LossGuard
from llamalab.train.step import clip_and_step, forward_backward

MicroBatches = list[Any]  # (x, y) tuples, or UnitBatch objects (llamalab.train.step)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingInterrupted(LlamalabError):
    """SIGTERM/SIGINT stopped training after writing a checkpoint; ``exit_code`` is 128 + the signal."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


@dataclass
class LoopSettings:
    name: str  # "pretrain", "sft", ...: the progress label
    run_dir: Path  # the run folder (layout: llamalab.run_dir.RunDir)
    steps: int
    peak_lr: float
    warmup: int
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    tokens_per_step: int = 0  # for tokens/s and MFU; 0: count target tokens per step instead
    flops_per_token: float = 0.0
    peak_flops: float = 0.0
    checkpoint_interval: int = 100
    keep_last: int = 0
    eval_interval: int = 0
    stop_after: int = 0
    max_seconds: float = 0.0
    resume: bool = False
    restart_if_corrupt: bool = False  # --resume with every checkpoint corrupt: start over instead of an error
    final_model: bool = False  # a completed schedule publishes the last checkpoint's model as RUN/model
    tensorboard: bool = False
    fault_nan_steps: tuple[int, ...] = ()
    guard: GuardConfig = dataclasses.field(default_factory=GuardConfig)


class Metrics:
    """metrics.jsonl (rank 0), plus TensorBoard when asked."""

    def __init__(self, run: RunDir, tensorboard: bool) -> None:
        self.path = run.metrics
        self.tb = None
        if tensorboard and is_rank0():
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

            self.tb = SummaryWriter(str(run.tensorboard))

    def truncate_after(self, step: int) -> int:
        """Drop lines past ``step`` (written after the checkpoint we resume from); returns how many."""
        if not self.path.exists() or not is_rank0():
            return 0
        lines = self.path.read_text().splitlines()
        keep = [ln for ln in lines if json.loads(ln).get("step", 0) <= step]
        self.path.write_text("".join(ln + "\n" for ln in keep))
        return len(lines) - len(keep)

    def log(self, row: dict[str, Any]) -> None:
        if not is_rank0():
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step" and v is not None:
                    self.tb.add_scalar(k, v, row["step"])


def config_changes(old: dict, new: dict, prefix: str = "") -> dict[str, tuple]:
    out = {}
    for k in set(old) | set(new):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out.update(config_changes(a, b, f"{prefix}{k}."))
        elif a != b:
            out[f"{prefix}{k}"] = (a, b)
    return out


class Trainer:
    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, settings: LoopSettings,
                 batch: Callable[[int], MicroBatches], run_cfg: dict[str, Any],
                 tokenizer_path: str | Path | None = None,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                 eval_fn: Callable[[torch.nn.Module, Callable], float | dict[str, float] | None] | None = None,
                 loss_fn: Callable[..., Any] | None = None,  # (model, x, y) or (model, batch): see train/step.py
                 model_extra: dict[str, Any] | None = None,
                 scaler: torch.amp.GradScaler | None = None) -> None:
        self.model = model  # may be replaced by a parallel wrapper before fit()
        self.optimizer = optimizer
        self.s = settings
        self.batch = batch
        self.run_cfg = run_cfg
        self.tokenizer_path = tokenizer_path
        self.autocast = autocast
        self.eval_fn = eval_fn
        self.loss_fn = loss_fn
        self.model_extra = model_extra or {}
        self.scaler = scaler  # fp16 dynamic loss scaling (None: bf16/fp32)
        self.run = RunDir(settings.run_dir)
        self.ckpt_root = self.run.checkpoints
        self.state = TrainState()
        self.guard = LossGuard(settings.guard)
        self.logbook = Logbook(self.run.logbook, enabled=is_rank0())
        self.metrics = Metrics(self.run, settings.tensorboard)
        self.last_val: float | None = None
        self._saved_step = -1  # the step of the newest checkpoint on disk from this invocation
        self._signal: int | None = None  # a stop signal received, acted on between steps

    # ------------------------------------------------------------------ resume

    def restore(self) -> None:
        """With ``resume``: load the newest checkpoint that verifies (logging the bad ones)."""
        if is_rank0():
            removed = remove_partial_writes(self.ckpt_root, self.run.root)
            if removed:
                print0(f"{self.s.name}: removed {len(removed)} unfinished write(s) of an earlier crash: "
                       f"{', '.join(Path(p).name for p in removed)}")
                self.logbook.log("partial_writes_removed", paths=removed)
        _barrier()
        checkpoints = list_checkpoints(self.ckpt_root)
        if checkpoints and not self.s.resume:
            raise LlamalabError(f"{self.run.root} already holds checkpoints: pass --resume to continue it, "
                                f"or choose a new --run-dir")
        if not self.s.resume:
            self._start_from_scratch("start")
            return
        if not checkpoints:
            print0(f"{self.s.name}: --resume given but {self.ckpt_root} holds no checkpoint yet; starting at step 0")
            self._start_from_scratch("start", note="resume requested, no checkpoint")
            return
        bad: list[tuple[Path, str]] = []

        def on_bad(path: Path, why: str) -> None:
            bad.append((path, why))
            self.logbook.log("bad_checkpoint", path=str(path), reason=why)

        good = latest_good_checkpoint(self.ckpt_root, on_bad=on_bad)
        if good is None:
            self._restart_after_corruption(bad)
            return
        self._load(good)
        dropped = self.metrics.truncate_after(self.state.step)
        changes = config_changes(self._old_cfg, self.run_cfg)
        changes.pop("resume", None)
        self.logbook.log("restart", step=self.state.step, checkpoint=str(good), metrics_lines_dropped=dropped)
        if changes:
            self.logbook.log("config_change", step=self.state.step, changes={k: list(v) for k, v in changes.items()})
        print0(f"{self.s.name}: resumed from {good} (step {self.state.step}, {self.state.tokens_seen:,} tokens)")

    def _start_from_scratch(self, event: str, **fields: Any) -> None:
        """Step 0: metrics.jsonl starts empty (lines of an earlier attempt that left no checkpoint go)."""
        dropped = self.metrics.truncate_after(0)
        self.logbook.log(event, steps=self.s.steps, **fields, **({"metrics_lines_dropped": dropped} if dropped else {}))

    def _restart_after_corruption(self, bad: list[tuple[Path, str]]) -> None:
        """``--resume`` found checkpoints but none verifies: an error, or (``restart_if_corrupt``) step 0."""
        names = ", ".join(f"{p.name} ({why})" for p, why in bad)
        if not self.s.restart_if_corrupt:
            raise LlamalabError(f"{self.ckpt_root}: no checkpoint verifies, so --resume cannot continue the run: "
                                f"{names}. Restore them from a copy, or start over: pass --restart-if-corrupt "
                                f"(pretrain) to set them aside as step_N{CORRUPT_SUFFIX} and train again from "
                                f"step 0, or move them away yourself")
        _barrier()  # every rank has verified before rank 0 renames
        moved = [str(set_aside(p)) for p, _ in bad] if is_rank0() else []
        _barrier()
        print0(f"{self.s.name}: every checkpoint failed verification ({names}); --restart-if-corrupt: "
               f"starting over from step 0 (set aside as *.corrupt, metrics.jsonl restarted)")
        self._start_from_scratch("restart_from_scratch", reason="every checkpoint failed verification",
                                 set_aside=moved)

    def _load(self, folder: Path) -> None:
        skips = set(self.state.skip_batches)
        self.state, self._old_cfg = load_checkpoint(folder, unwrap(self.model), self.optimizer)
        self._saved_step = self.state.step
        self.state.skip_batches = tuple(sorted(set(self.state.skip_batches) | skips))
        self.guard.load_state_dict(list(self.state.guard))
        if self.scaler is not None and self.state.grad_scaler:
            self.scaler.load_state_dict(self.state.grad_scaler)

    def save(self) -> Path | None:
        """Checkpoint now. NOTE: a collective: every rank calls it (FSDP ranks all write shards)."""
        path = None
        sharded = is_sharded(self.model)
        if is_rank0() or sharded:
            state = dataclasses.replace(self.state, guard=tuple(self.guard.state_dict()),
                                        grad_scaler=self.scaler.state_dict() if self.scaler is not None else None)
            path = save_checkpoint(self.ckpt_root, unwrap(self.model), self.optimizer, state, self.run_cfg,
                                   self.tokenizer_path, model_extra={"run": str(self.run.root), **self.model_extra})
        if is_rank0():
            if self.s.keep_last:
                for old in list_checkpoints(self.ckpt_root)[:-self.s.keep_last]:
                    shutil.rmtree(old, ignore_errors=True)
        _barrier()
        self._saved_step = self.state.step
        return path

    # ------------------------------------------------------------------ stop signals

    @contextlib.contextmanager
    def _stop_signals(self):
        """While training: SIGTERM/SIGINT set a flag the loop reads between steps (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}

        def restore() -> None:
            for s, h in previous.items():
                signal.signal(s, h)

        def on_signal(signum: int, frame: Any) -> None:
            if self._signal is not None:  # a second one: stop now, as without the handler
                restore()
                if signum == signal.SIGINT:
                    raise KeyboardInterrupt
                os.kill(os.getpid(), signum)
                return
            self._signal = signum
            print0(f"\n{self.s.name}: {signal.Signals(signum).name} received: finishing this step, then a checkpoint "
                   f"(send it again to stop at once, without one)")

        for s in STOP_SIGNALS:
            signal.signal(s, on_signal)
        try:
            yield
        finally:
            restore()

    def _stop_requested(self) -> int | None:
        """The signal to stop for, agreed by every rank (a signal may reach only some of them)."""
        signum = self._signal or 0
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            dev = torch.device("cuda", torch.cuda.current_device()) \
                if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
            t = torch.tensor([signum], dtype=torch.int64, device=dev)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            signum = int(t.item())
        return signum or None

    def _stop_for_signal(self, signum: int) -> None:
        st = self.state
        name = signal.Signals(signum).name
        path = None
        if st.step > 0:
            path = self.save() if self._saved_step != st.step else self.run.checkpoint(st.step)
        self.logbook.log("stop", step=st.step, reason=f"signal {name}", checkpoint=str(path) if path else None)
        where = f"checkpoint {path}; --resume continues" if path else "nothing trained yet, no checkpoint"
        raise TrainingInterrupted(f"{self.s.name}: stopped by {name} after step {st.step} ({where})", signum)

    # ------------------------------------------------------------------ the final model

    def _drop_stale_final_model(self) -> None:
        """More steps to train: a ``model/`` published by an earlier, shorter schedule is no longer final."""
        model = self.run.model
        if not (self.s.final_model and is_rank0() and model.exists() and self.state.step < self.s.steps):
            return
        try:
            step = json.loads((model / "config.json").read_text()).get("step")
        except (OSError, ValueError):
            step = None
        if step is None:
            raise LlamalabError(f"{model}: the run folder holds a model/ that training did not write; "
                                f"move it away or choose another --run-dir")
        shutil.rmtree(model)
        self.logbook.log("final_model_removed", step=self.state.step, model_step=step,
                         reason=f"training continues to step {self.s.steps}")

    def _publish_final_model(self) -> Path | None:
        if not (self.s.final_model and is_rank0() and self.state.step >= self.s.steps):
            return None
        ckpt = self.run.checkpoint(self.state.step)
        if not ckpt.is_dir():
            print0(f"{self.s.name}: no checkpoint at step {self.state.step}; {self.run.model} not written")
            return None
        out = publish_model(ckpt, self.run.model)
        self.logbook.log("final_model", step=self.state.step, path=str(out), source=str(ckpt))
        return out

    # ------------------------------------------------------------------ the loop

    def _handle_bad(self, kind: str, action: str, loss: float, b: int) -> None:
        """A NaN or a spike at batch ``b``: skip it, roll back past it, or stop."""
        st = self.state
        self.optimizer.zero_grad(set_to_none=True)
        self.logbook.log(kind, step=st.step + 1, batch=b, loss=loss, reference=self.guard.reference(), action=action)
        print0(f"{self.s.name}: {kind} at step {st.step + 1} (loss {loss:.4g}, batch {b}): {action}")
        if action == "stop":
            self.save()
            raise LlamalabError(f"training stopped: {kind} loss at step {st.step + 1} (see {self.run.logbook})")
        st.skip_batches = tuple(sorted(set(st.skip_batches) | {b}))
        if action == "rollback" and self._rollbacks < self.s.guard.max_rollbacks:
            good = latest_good_checkpoint(self.ckpt_root)
            if good is not None:
                self._rollbacks += 1
                self._load(good)
                self.metrics.truncate_after(self.state.step)
                self.logbook.log("rollback", to_step=self.state.step, checkpoint=str(good),
                                 skip_batches=list(self.state.skip_batches))
                return
        st.batch_index = b + 1

    def fit(self) -> dict[str, Any]:
        self._drop_stale_final_model()
        with self._stop_signals():
            return self._fit()

    def _fit(self) -> dict[str, Any]:
        s, st = self.s, self.state
        bar = Progress(s.steps, s.name, unit="steps", every=2.0)
        bar.n = st.step
        t_start = time.perf_counter()
        steps_this_run, tokens_this_run = 0, 0
        self._rollbacks = 0
        drilled: set[int] = set()
        self.model.train()
        while self.state.step < s.steps:
            signum = self._stop_requested()
            if signum is not None:
                bar.close()
                self._stop_for_signal(signum)
            st = self.state
            b = st.batch_index
            while b in st.skip_batches:
                b += 1
            micro = self.batch(b)
            lr = lr_at(st.step, s.peak_lr, s.warmup, s.steps, s.min_lr_ratio)
            set_lr(self.optimizer, lr)
            t0 = time.perf_counter()
            res = forward_backward(self.model, micro, self.autocast, self.loss_fn, self.scaler)
            loss = res.loss
            if st.step + 1 in s.fault_nan_steps and st.step + 1 not in drilled:
                drilled.add(st.step + 1)  # a drill fires once per step, so the retry can succeed
                loss = float("nan")
            kind, action = self.guard.check(loss)
            if kind != "ok":
                self._handle_bad(kind, action, loss, b)
                bar.n = self.state.step
                continue
            grad_norm = clip_and_step(self.model, self.optimizer, s.grad_clip, self.scaler)
            self.guard.accept(loss)
            dt = time.perf_counter() - t0
            tokens = s.tokens_per_step or res.n_input_tokens or res.n_tokens
            st.step += 1
            st.batch_index = b + 1
            st.tokens_seen += tokens
            steps_this_run += 1
            tokens_this_run += tokens
            tps = tokens / dt
            row = {"step": st.step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_seen": st.tokens_seen,
                   "tokens_per_s": tps, "mfu": s.flops_per_token * tps / s.peak_flops if s.peak_flops else None,
                   "batch": b, "step_time": dt, "elapsed": time.perf_counter() - t_start}
            row.update(res.stats)  # a loss_fn's statistics (preference accuracy, margins, KL ...)
            if self.scaler is not None:  # an overflowed fp16 step was skipped by the scaler (norm inf/nan)
                row["loss_scale"] = float(self.scaler.get_scale())
                row["overflow"] = not math.isfinite(grad_norm)
            if self.eval_fn is not None and s.eval_interval and (st.step % s.eval_interval == 0 or st.step == s.steps):
                self.last_val = self._evaluate(row)
                if self.last_val is not None and (st.best_val_loss is None or self.last_val < st.best_val_loss):
                    st.best_val_loss = self.last_val
            self.metrics.log(row)
            mfu = f" mfu {row['mfu']:.1%}" if row["mfu"] is not None else ""
            val = f" val {self.last_val:.4f}" if "val_loss" in row and self.last_val is not None else ""
            bar.update(1, extra=f"loss {loss:.4f} lr {lr:.2e} |g| {grad_norm:.2f} {tps:,.0f} tok/s{mfu}{val}")
            done = st.step == s.steps
            out_of_time = bool(s.max_seconds) and time.perf_counter() - t_start > s.max_seconds
            stop_now = bool(s.stop_after and steps_this_run >= s.stop_after) or out_of_time
            if done or stop_now or (s.checkpoint_interval and st.step % s.checkpoint_interval == 0):
                self.save()
            if stop_now and not done:
                self.logbook.log("stop", step=st.step, reason="max_seconds" if out_of_time else "stop_after")
                break
        bar.close()
        final = self._publish_final_model()
        return self._summary(time.perf_counter() - t_start, steps_this_run, tokens_this_run, final)

    def _evaluate(self, row: dict[str, Any]) -> float | None:
        """Run eval_fn; a float is the validation loss, a dict adds its other entries as ``val_<name>``."""
        out = self.eval_fn(unwrap(self.model), self.autocast)
        if isinstance(out, dict):
            row.update({f"val_{k}": v for k, v in out.items() if k != "loss"})
            out = out.get("loss")
        row["val_loss"] = out
        return out

    def _summary(self, elapsed: float, steps_this_run: int, tokens_this_run: int,
                 final_model: Path | None = None) -> dict[str, Any]:
        st = self.state
        self.logbook.log("end", step=st.step, tokens_seen=st.tokens_seen, seconds=round(elapsed, 2))
        final = self.guard.recent[-1] if self.guard.recent else None
        summary = {"run_dir": str(self.run.root), "steps": st.step, "planned_steps": self.s.steps,
                   "tokens_seen": st.tokens_seen, "seconds": elapsed, "final_loss": final, "val_loss": self.last_val,
                   "tokens_per_s": tokens_this_run / elapsed if elapsed else None,
                   "skipped_batches": list(st.skip_batches), "model": str(final_model) if final_model else None}
        fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
        print0(f"{self.s.name}: {st.step}/{self.s.steps} steps, {st.tokens_seen:,} tokens in {elapsed:.1f}s | "
               f"loss {fmt(final)} | val {fmt(self.last_val)} | {len(st.skip_batches)} batches skipped | "
               f"checkpoints in {self.ckpt_root}")
        if final_model is not None:
            print0(f"{self.s.name}: final model {final_model}")
        elif self.s.final_model and st.step < self.s.steps:
            print0(f"{self.s.name}: schedule not complete ({st.step}/{self.s.steps}): the newest checkpoint is the "
                   f"model until --resume finishes it")
        return summary


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
