"""Evaluate a loaded model on benchmark files: multiple choice, perplexity, QA, GSM8K, HumanEval.

:func:`evaluate_task` scores one task on one data file and returns the result written as
``<task>.json``: metrics (with standard errors), the task definition, the options, the data file's
sha256 and one record per item (log-likelihoods, predictions, completions). The commands ``llamalab
eval run`` (:mod:`llamalab.commands.eval.run`) and ``llamalab eval sweep`` call it; task definitions
and prompt formats are in :mod:`llamalab.eval.tasks`, scoring in :mod:`llamalab.eval.loglik` and
:mod:`llamalab.eval.generative`.

The knobs of scoring travel as :class:`EvalSettings`, not as a command's config, so that a sweep, a
single run and Python callers share one definition; the settings are recorded in each result (a
sweep compares them to decide whether an old result is still current).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from llamalab.common import LlamalabError, sha256_file
from llamalab.eval.tasks import Item, Task, build_context, choice_pairs, load_items

if TYPE_CHECKING:
    from llamalab.model.folder import Loaded


@dataclass
class EvalSettings:
    """How tasks are scored; every field is recorded in the result's ``options``."""

    num_fewshot: int = -1  # -1: each task's default (already applied to the Task; recorded only)
    limit: int = 0  # first N items (0: all)
    batch_size: int = 16
    num_samples: int = 1  # samples per prompt: maj@k (GSM8K), pass@k (HumanEval)
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    max_new_tokens: int = 0  # 0: the task's default
    stride: int = 0  # perplexity window stride in tokens (0: the full context)
    timeout: float = 10.0  # seconds per sandboxed HumanEval program
    workers: int = 2  # parallel sandboxed programs
    allow_unsandboxed: bool = False  # run HumanEval programs even where no OS isolation is available
    seed: int = 0

    def validate(self) -> None:
        if self.num_samples < 1:
            raise LlamalabError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.num_samples > 1 and self.temperature <= 0:
            raise LlamalabError("num_samples > 1 needs --temperature > 0 (greedy samples are all identical)")


def check_task_files(task: Sequence[str], path: Sequence[str], fewshot_path: Sequence[str] = ()) -> None:
    """``--task``, ``--path`` and ``--fewshot-path`` are aligned lists: one data file per task."""
    if not task:
        raise LlamalabError("task: give at least one task")
    if len(path) != len(task):
        raise LlamalabError(f"path: {len(task)} task(s) need {len(task)} data file(s) in --path, got {len(path)}")
    if fewshot_path and len(fewshot_path) != len(task):
        raise LlamalabError("fewshot_path: give one file per task (same order as --task)")


def load_for_eval(path: str | Path, device: str = "auto", dtype: str = "auto") -> Loaded:
    """:func:`llamalab.model.folder.load`, refusing a tokenizer with ids the model has no embedding for."""
    from llamalab.model.folder import load

    loaded = load(path, device, dtype)
    if loaded.tokenizer.vocab_size > loaded.model.cfg.vocab_size:
        raise LlamalabError(f"{path}: tokenizer has {loaded.tokenizer.vocab_size} pieces, "
                            f"the model only {loaded.model.cfg.vocab_size}")
    return loaded


def mean_stderr(values: list[float]) -> tuple[float, float]:
    n = len(values)
    m = sum(values) / n
    if n < 2:
        return m, 0.0
    var = sum((v - m) ** 2 for v in values) / (n - 1)
    return m, math.sqrt(var / n)


def with_stderr(records: list[dict[str, Any]], keys: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for k in keys:
        m, se = mean_stderr([float(r[k]) for r in records])
        out[k], out[f"{k}_stderr"] = m, se
    return out


# ----------------------------------------------------------------------------- per kind


def eval_multiple_choice(model, tokenizer, task: Task, items: list[Item], pool: list[Item], batch_size: int,
                         where: str) -> tuple[dict[str, float], list[dict[str, Any]]]:
    from llamalab.eval.loglik import choice_metrics, model_logits_fn, score_text_pairs

    pairs, spans = [], []
    for it in items:
        p, _ = choice_pairs(task, it, pool, f"{where}:{it.line}")
        spans.append((len(pairs), len(p)))
        pairs += p
    scored = score_text_pairs(model_logits_fn(model), tokenizer, pairs, model.cfg.max_seq_len, batch_size,
                              label=f"{task.name} loglik")
    recs = []
    for it, (start, n) in zip(items, spans):
        s = scored[start:start + n]
        _, conts = choice_pairs(task, it, pool, where)
        lls = [x.loglik for x in s]
        m = choice_metrics(lls, conts, it.fields["gold"])
        recs.append({"id": it.id, "line": it.line, "gold": it.fields["gold"], "loglik": lls,
                     "n_tokens": [x.n_tokens for x in s], "is_greedy": [x.is_greedy for x in s],
                     "pred": max(range(n), key=lambda i: lls[i]), **m})
    return with_stderr(recs, ["acc", "acc_norm", "acc_bytes"]), recs


def eval_perplexity(model, tokenizer, task: Task, items: list[Item], stride: int = 0) -> tuple[dict[str, float], list]:
    from llamalab.common import Progress
    from llamalab.eval.loglik import PerplexityTotals, document_nll, model_logits_fn, prefix_ids

    fn = model_logits_fn(model)
    L = model.cfg.max_seq_len
    tot, recs = PerplexityTotals(), []
    bar = Progress(len(items), f"{task.name} perplexity", "doc")
    for it in items:
        text = it.fields["text"]
        ids = prefix_ids(tokenizer) + tokenizer.encode(text)  # BOS (else EOS) first, never scored: lm-eval's rule
        nll, n = document_nll(fn, ids, L, stride or L)
        b, w = len(text.encode("utf-8")), len(text.split())
        tot.nll, tot.tokens, tot.bytes = tot.nll + nll, tot.tokens + n, tot.bytes + b
        tot.words, tot.docs = tot.words + w, tot.docs + 1
        recs.append({"id": it.id, "line": it.line, "nll": nll, "tokens": n, "bytes": b,
                     "bits_per_byte": nll / (max(b, 1) * math.log(2))})
        bar.update()
    bar.close()
    return tot.metrics(), recs


def eval_generative(model, tokenizer, task: Task, items: list[Item], pool: list[Item], settings: EvalSettings,
                    where: str, sample_fn=None) -> tuple[dict[str, float], list[dict[str, Any]]]:
    from llamalab.eval import generative as G

    max_new = settings.max_new_tokens or task.max_new_tokens
    if task.kind == "humaneval":  # refuse before generating when the completions could not be run safely
        from llamalab.eval.sandbox import require_isolation

        require_isolation(settings.allow_unsandboxed)
    if sample_fn is None:
        sample_fn = G.model_sample_fn(model, tokenizer, max_new, task.until, settings.batch_size, settings.seed,
                                      settings.top_p)
    prompts = [build_context(task, it, pool, f"{where}:{it.line}") for it in items]
    comps = G.run_generation(sample_fn, prompts, settings.num_samples, settings.temperature, f"{task.name} generate")
    comps = [[_cut(c, task.until) for c in cs] for cs in comps]
    if task.kind == "qa":
        metrics, recs = G.score_qa(comps, [it.fields["answers"] for it in items])
        metrics = with_stderr(recs, ["exact_match", "f1"])
    elif task.kind == "gsm8k":
        metrics, recs = G.score_gsm8k(comps, [it.fields["target"] for it in items])
        metrics = with_stderr(recs, list(metrics))
    else:
        ks = [k for k in (1, 10, 100) if k <= settings.num_samples]
        metrics, recs = G.score_humaneval([it.fields for it in items], comps, ks, settings.timeout, settings.workers,
                                           allow_unsandboxed=settings.allow_unsandboxed)
        metrics = with_stderr(recs, list(metrics))
    for it, r in zip(items, recs):
        r.setdefault("id", it.id)
        r["line"] = it.line
    return metrics, recs


def _cut(text: str, until: list[str]) -> str:
    cuts = [text.find(s) for s in until if s and s in text]
    return text[:min(cuts)] if cuts else text


# ----------------------------------------------------------------------------- one task, many tasks


def evaluate_task(model, tokenizer, task: Task, path: str | Path, settings: EvalSettings, fewshot_path: str = "",
                  sample_fn=None, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate one task on one file -> the result dict written as ``<task>.json``.

    ``options`` adds to the recorded settings (the command's device, dtype, few-shot files)."""
    t0 = time.perf_counter()
    items = load_items(task, path, settings.limit)
    if fewshot_path:
        pool = load_items(task, fewshot_path, 0)
    else:
        pool = items if settings.limit == 0 else load_items(task, path, 0)
    where = str(path)
    if task.kind == "multiple_choice":
        metrics, recs = eval_multiple_choice(model, tokenizer, task, items, pool, settings.batch_size, where)
    elif task.kind == "perplexity":
        metrics, recs = eval_perplexity(model, tokenizer, task, items, settings.stride)
    else:
        metrics, recs = eval_generative(model, tokenizer, task, items, pool, settings, where, sample_fn)
    return {"task": task.name, "kind": task.kind, "path": str(path), "sha256": sha256_file(path),
            "fewshot_path": fewshot_path or None, "n": len(items), "metrics": metrics,
            "seconds": round(time.perf_counter() - t0, 3), "task_def": task.to_dict(),
            "options": {**asdict(settings), **(options or {})},
            "items": recs}


MAIN_METRIC = {"multiple_choice": "acc_norm", "perplexity": "bits_per_byte", "qa": "exact_match",
               "gsm8k": "exact_match_flexible", "humaneval": "pass@1"}


def summary_table(results: list[dict[str, Any]]) -> str:
    rows = [f"{'task':<18} {'metric':<22} {'value':>9} {'stderr':>8} {'n':>6}"]
    for r in results:
        for k, v in r["metrics"].items():
            if k.endswith("_stderr") or not isinstance(v, float):
                continue
            se = r["metrics"].get(f"{k}_stderr")
            rows.append(f"{r['task']:<18} {k:<22} {v:>9.4f} {'' if se is None else f'{se:.4f}':>8} {r['n']:>6}")
    return "\n".join(rows)
