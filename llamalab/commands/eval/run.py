"""Evaluate a model on benchmark files: multiple choice, perplexity, QA, GSM8K, HumanEval.

    llamalab eval run MODEL --task arc_easy,hellaswag --path ARC-Easy-Dev.jsonl,hellaswag.jsonl
    llamalab eval run MODEL --task my_task.json --path data.jsonl --output results/

MODEL is anything the loader reads (a model folder, a run folder, a Hugging Face folder, a .gguf
file). ``--task`` and ``--path`` are aligned lists (one file per task; the CLI never downloads
data). Each task writes ``<output>/<task>.json`` (:func:`llamalab.eval.run.evaluate_task`); a
summary table ends the run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamalab.common import LlamalabError, print0, write_json_atomic
from llamalab.eval.run import EvalSettings, check_task_files, evaluate_task, load_for_eval, summary_table
from llamalab.eval.tasks import get_task


@dataclass
class Config:
    model: str = field(default="", metadata={"positional": True, "help": "model, run or HF folder, or .gguf file"})
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
    allow_unsandboxed: bool = field(default=False, metadata={
        "help": "run HumanEval programs without OS isolation where namespaces are unavailable (unsafe; "
                "or LLAMALAB_ALLOW_UNSANDBOXED=1)"})
    output: str = field(default="eval-results", metadata={"help": "folder for <task>.json results ('' = none)"})
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0

    def settings(self) -> EvalSettings:
        return EvalSettings(num_fewshot=self.num_fewshot, limit=self.limit, batch_size=self.batch_size,
                            num_samples=self.num_samples, temperature=self.temperature, top_p=self.top_p,
                            max_new_tokens=self.max_new_tokens, stride=self.stride, timeout=self.timeout,
                            workers=self.workers, allow_unsandboxed=self.allow_unsandboxed, seed=self.seed)

    def validate(self) -> None:
        if not self.model:
            raise LlamalabError("model: give a llamalab model folder (llamalab eval run MODEL --task ... --path ...)")
        check_task_files(self.task, self.path, self.fewshot_path)
        self.settings().validate()


def main(cfg: Config) -> list[dict[str, Any]]:
    cfg.validate()
    tasks = [get_task(t, cfg.num_fewshot) for t in cfg.task]
    loaded = load_for_eval(cfg.model, cfg.device, cfg.dtype)
    settings = cfg.settings()
    recorded = {"fewshot_path": cfg.fewshot_path, "device": cfg.device, "dtype": cfg.dtype}
    t0 = time.perf_counter()
    results = []
    for i, task in enumerate(tasks):
        res = evaluate_task(loaded.model, loaded.tokenizer, task, cfg.path[i], settings,
                            cfg.fewshot_path[i] if cfg.fewshot_path else "", options=recorded)
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
