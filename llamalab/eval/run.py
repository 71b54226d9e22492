"""Evaluate a model folder on benchmark files: multiple choice, perplexity, QA, GSM8K, HumanEval.

    llamalab eval run MODEL --task arc_easy,hellaswag --path ARC-Easy-Dev.jsonl,hellaswag.jsonl
    llamalab eval run MODEL --task my_task.json --path data.jsonl --output results/

``--task`` and ``--path`` are aligned lists (one file per task; the CLI never downloads data).
Each task writes ``<output>/<task>.json``: metrics (with standard errors), the task definition,
the options, the data file's sha256 and one record per item (log-likelihoods, predictions,
completions). A summary table ends the run. Task definitions and prompt formats:
:mod:`llamalab.eval.tasks`; scoring: :mod:`llamalab.eval.loglik`, :mod:`llamalab.eval.generative`.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llamalab.common import LlamalabError, print0, resolve_device, resolve_dtype, sha256_file, write_json_atomic
from llamalab.eval.tasks import Item, Task, choice_pairs, build_context, get_task, load_items


@dataclass
class Config:
    model: str = field(default="", metadata={"positional": True, "help": "llamalab model folder"})
    task: list[str] = field(default_factory=lambda: ["arc_easy"],
                            metadata={"help": "comma-separated task names or task .json files"})
    path: list[str] = field(default_factory=list, metadata={"help": "data file per task (comma-separated, same order)"})
    fewshot_path: list[str] = field(default_factory=list,
                                    metadata={"help": "few-shot example file per task (default: the task file itself)"})
    num_fewshot: int = field(default=-1, metadata={"help": "override the tasks' number of examples (-1: task default)"})
    limit: int = field(default=0, metadata={"help": "evaluate only the first N items (0: all)"})
    batch_size: int = 16
    num_samples: int = field(default=1, metadata={"help": "samples per prompt: maj@k (GSM8K), pass@k (HumanEval)"})
    temperature: float = field(default=0.0, metadata={"help": "0: greedy; >0 needed when num_samples > 1"})
    top_p: float = 1.0
    max_new_tokens: int = field(default=0, metadata={"help": "0: the task's default"})
    stride: int = field(default=0, metadata={"help": "perplexity window stride in tokens (0: the full context)"})
    timeout: float = field(default=10.0, metadata={"help": "seconds per sandboxed HumanEval program"})
    workers: int = field(default=2, metadata={"help": "parallel sandboxed programs"})
    output: str = field(default="eval-results", metadata={"help": "folder for <task>.json results ('' = none)"})
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0

    def validate(self) -> None:
        if not self.model:
            raise LlamalabError("model: give a llamalab model folder (llamalab eval run MODEL --task ... --path ...)")
        self.check_tasks()

    def check_tasks(self) -> None:
        if not self.task:
            raise LlamalabError("task: give at least one task")
        if len(self.path) != len(self.task):
            raise LlamalabError(f"path: {len(self.task)} task(s) need {len(self.task)} data file(s) in --path, "
                                f"got {len(self.path)}")
        if self.fewshot_path and len(self.fewshot_path) != len(self.task):
            raise LlamalabError("fewshot_path: give one file per task (same order as --task)")
        if self.num_samples < 1:
            raise LlamalabError(f"num_samples must be >= 1, got {self.num_samples}")
        if self.num_samples > 1 and self.temperature <= 0:
            raise LlamalabError("num_samples > 1 needs --temperature > 0 (greedy samples are all identical)")


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


def eval_multiple_choice(model, tokenizer, task: Task, items: list[Item], pool: list[Item], cfg: Config,
                         where: str) -> tuple[dict[str, float], list[dict[str, Any]]]:
    from llamalab.eval.loglik import choice_metrics, model_logits_fn, score_text_pairs

    pairs, spans = [], []
    for it in items:
        p, _ = choice_pairs(task, it, pool, f"{where}:{it.line}")
        spans.append((len(pairs), len(p)))
        pairs += p
    scored = score_text_pairs(model_logits_fn(model), tokenizer, pairs, model.cfg.max_seq_len, cfg.batch_size,
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


def eval_perplexity(model, tokenizer, task: Task, items: list[Item], cfg: Config) -> tuple[dict[str, float], list]:
    from llamalab.common import Progress
    from llamalab.eval.loglik import PerplexityTotals, document_nll, model_logits_fn

    fn = model_logits_fn(model)
    L = model.cfg.max_seq_len
    tot, recs = PerplexityTotals(), []
    bar = Progress(len(items), f"{task.name} perplexity", "doc")
    for it in items:
        text = it.fields["text"]
        ids = tokenizer.encode(text, bos=True)
        nll, n = document_nll(fn, ids, L, cfg.stride or L)
        b, w = len(text.encode("utf-8")), len(text.split())
        tot.nll, tot.tokens, tot.bytes, tot.words, tot.docs = tot.nll + nll, tot.tokens + n, tot.bytes + b, tot.words + w, tot.docs + 1
        recs.append({"id": it.id, "line": it.line, "nll": nll, "tokens": n, "bytes": b,
                     "bits_per_byte": nll / (max(b, 1) * math.log(2))})
        bar.update()
    bar.close()
    return tot.metrics(), recs


def eval_generative(model, tokenizer, task: Task, items: list[Item], pool: list[Item], cfg: Config,
                    where: str, sample_fn=None) -> tuple[dict[str, float], list[dict[str, Any]]]:
    from llamalab.eval import generative as G

    max_new = cfg.max_new_tokens or task.max_new_tokens
    if sample_fn is None:
        sample_fn = G.model_sample_fn(model, tokenizer, max_new, task.until, cfg.batch_size, cfg.seed, cfg.top_p)
    prompts = [build_context(task, it, pool, f"{where}:{it.line}") for it in items]
    comps = G.run_generation(sample_fn, prompts, cfg.num_samples, cfg.temperature, f"{task.name} generate")
    comps = [[_cut(c, task.until) for c in cs] for cs in comps]
    if task.kind == "qa":
        metrics, recs = G.score_qa(comps, [it.fields["answers"] for it in items])
        metrics = with_stderr(recs, ["exact_match", "f1"])
    elif task.kind == "gsm8k":
        metrics, recs = G.score_gsm8k(comps, [it.fields["target"] for it in items])
        metrics = with_stderr(recs, list(metrics))
    else:
        ks = [k for k in (1, 10, 100) if k <= cfg.num_samples]
        metrics, recs = G.score_humaneval([it.fields for it in items], comps, ks, cfg.timeout, cfg.workers)
        metrics = with_stderr(recs, list(metrics))
    for it, r in zip(items, recs):
        r.setdefault("id", it.id)
        r["line"] = it.line
    return metrics, recs


def _cut(text: str, until: list[str]) -> str:
    cuts = [text.find(s) for s in until if s and s in text]
    return text[:min(cuts)] if cuts else text


# ----------------------------------------------------------------------------- one task, many tasks


def evaluate_task(model, tokenizer, task: Task, path: str | Path, cfg: Config, fewshot_path: str = "",
                  sample_fn=None) -> dict[str, Any]:
    """Evaluate one task on one file -> the result dict written as ``<task>.json``."""
    t0 = time.perf_counter()
    items = load_items(task, path, cfg.limit)
    pool = load_items(task, fewshot_path, 0) if fewshot_path else items if cfg.limit == 0 else load_items(task, path, 0)
    where = str(path)
    if task.kind == "multiple_choice":
        metrics, recs = eval_multiple_choice(model, tokenizer, task, items, pool, cfg, where)
    elif task.kind == "perplexity":
        metrics, recs = eval_perplexity(model, tokenizer, task, items, cfg)
    else:
        metrics, recs = eval_generative(model, tokenizer, task, items, pool, cfg, where, sample_fn)
    return {"task": task.name, "kind": task.kind, "path": str(path), "sha256": sha256_file(path),
            "fewshot_path": fewshot_path or None, "n": len(items), "metrics": metrics,
            "seconds": round(time.perf_counter() - t0, 3), "task_def": task.to_dict(),
            "options": {k: v for k, v in asdict(cfg).items() if k not in ("model", "task", "path", "output")},
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


def load_model_and_tokenizer(folder: str | Path, device: str = "auto", dtype: str = "auto"):
    from llamalab.checkpoint import load_model, tokenizer_path
    from llamalab.tokenizer import Tokenizer

    dev = resolve_device(device)
    model, meta = load_model(folder, device=dev, dtype=resolve_dtype(dtype, dev))
    tok = tokenizer_path(folder)
    if tok is None:
        raise LlamalabError(f"{folder}: the model folder has no tokenizer.model (needed to evaluate)")
    return model, Tokenizer(tok)


def main(cfg: Config) -> list[dict[str, Any]]:
    cfg.validate()
    tasks = [get_task(t, cfg.num_fewshot) for t in cfg.task]
    model, tok = load_model_and_tokenizer(cfg.model, cfg.device, cfg.dtype)
    if tok.vocab_size > model.cfg.vocab_size:
        raise LlamalabError(f"{cfg.model}: tokenizer has {tok.vocab_size} pieces, the model only {model.cfg.vocab_size}")
    t0 = time.perf_counter()
    results = []
    for i, task in enumerate(tasks):
        res = evaluate_task(model, tok, task, cfg.path[i], cfg, cfg.fewshot_path[i] if cfg.fewshot_path else "")
        res["model"] = str(cfg.model)
        if cfg.output:
            write_json_atomic(Path(cfg.output) / f"{task.name}.json", res)
        results.append(res)
    print0(summary_table(results))
    n = sum(r["n"] for r in results)
    print0(f"evaluated {len(results)} task(s), {n} items in {time.perf_counter() - t0:.1f}s"
           + (f"; results in {cfg.output}/" if cfg.output else ""))
    return results


if __name__ == "__main__":
    from llamalab.cli import stage_main

    stage_main(Config, main)
