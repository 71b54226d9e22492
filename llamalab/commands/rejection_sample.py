"""Rejection sampling: ``llamalab rejection-sample --policy MODEL --rm RM --prompts FILE -k 4 --out DIR``.

Llama 2 (Touvron et al. 2023b, section 3.2.3): for each prompt the policy samples K answers (the engine, batched;
``--temperature``, ``--top-p``), the reward model scores them all, and the best is kept as a new SFT example.
Fine-tune on the kept set with the second command::

    llamalab rejection-sample --policy RUN_SFT --rm RUN_RM --prompts prompts.jsonl -k 8 --out rs
    llamalab sft --base RUN_SFT --data rs/kept.jsonl --format sharegpt --run-dir RUN_RS

Outputs in ``--out``:
  ``samples.jsonl``          every prompt with its K answers, their rewards and the index of the best
  ``kept.jsonl``             the best answer per prompt, ShareGPT (``conversations``), with its reward
  ``rejection_summary.json`` counts, the prompt ledger, mean and best rewards, the best-of-K curve for k = 1..K
  ``meta.json``, ``report.html`` (the best-of-K figure, a few kept answers)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from llamalab.align.data import FORMATS, read_prompts
from llamalab.align.rejection import (
    best_of_k_curve,
    curve_figure,
    engine_context,
    render_prompts,
    sample_answers,
    select_best,
    write_jsonl,
)
from llamalab.align.reward import load_reward_model, score_texts
from llamalab.common import LlamalabError, print0, resolve_device, resolve_dtype, seed_everything, write_json_atomic
from llamalab.config import to_dict
from llamalab.finetune.outputs import base_record
from llamalab.inference.engine import Engine
from llamalab.model.folder import load, resolve_model_path
from llamalab.run_dir import RunDir
from llamalab.tokenizer.templates import TEMPLATES, resolve_template
from llamalab.train.meta import files_record, run_meta, write_meta


@dataclass
class Config:
    policy: str = field(default="", metadata={"help": "the model that samples: a model or run folder, a HF folder "
                                                     "or a .gguf file"})
    rm: str = field(default="", metadata={"help": "the reward model folder (llamalab rm's RUN/model, or the run)"})
    prompts: list[str] = field(default_factory=list, metadata={
        "help": "prompt file(s): preference pairs (pairs, HH-RLHF) or {prompt}/{messages} records, JSON/JSONL"})
    k: int = field(default=4, metadata={"aliases": ["-k"], "help": "answers sampled per prompt"})
    out: str = field(default="runs/rejection", metadata={"help": "output folder"})
    format: str = field(default="auto", metadata={"choices": list(FORMATS), "help": "how pair files are read"})
    template: str = field(default="", metadata={"help": "the policy's chat template (default: its own)"})
    max_new_tokens: int = field(default=128, metadata={"help": "tokens per answer at most"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (> 0: the K answers differ)"})
    top_p: float = 1.0
    slots: int = field(default=16, metadata={"help": "sequences the engine decodes together"})
    batch_size: int = field(default=8, metadata={"help": "rows per reward-model forward pass"})
    limit: int = field(default=0, metadata={"help": "read at most N records (0: all)"})
    on_error: str = field(default="raise", metadata={"choices": ["raise", "skip"]})
    seed: int = 1337
    device: str = "auto"
    dtype: str = field(default="auto", metadata={"help": "the policy's weights (auto: bf16 on CUDA, fp32 on CPU)"})

    def validate(self) -> None:
        if not self.policy or not self.rm:
            raise LlamalabError("rejection-sample: give --policy MODEL and --rm REWARD_MODEL")
        if not self.prompts:
            raise LlamalabError("rejection-sample: give the prompts, --prompts FILE")
        if self.k < 1:
            raise LlamalabError(f"rejection-sample: -k must be >= 1, got {self.k}")
        if self.k > 1 and self.temperature == 0:
            raise LlamalabError("rejection-sample: --temperature 0 (greedy) gives K identical answers; use > 0")
        if self.template and self.template not in TEMPLATES:
            raise LlamalabError(f"--template: unknown {self.template!r}; choose one of {', '.join(TEMPLATES)}")
        for name in ("max_new_tokens", "slots", "batch_size"):
            if getattr(self, name) < 1:
                raise LlamalabError(f"rejection-sample: --{name.replace('_', '-')} must be >= 1")


def main(cfg: Config) -> dict[str, Any]:
    cfg.validate()
    device = resolve_device(cfg.device)
    loaded = load(cfg.policy, device=device, dtype=resolve_dtype(cfg.dtype, device))
    template = resolve_template(loaded.meta, cfg.template or None)
    rm, rm_tok, rm_meta = load_reward_model(cfg.rm, device=device)
    rm_template = resolve_template(rm_meta)
    prompts, ledger = read_prompts(cfg.prompts, cfg.format, cfg.limit, cfg.on_error)
    if not prompts:
        raise LlamalabError(f"rejection-sample: no prompts in {', '.join(cfg.prompts)} ({ledger.to_json()})")
    print0(f"rejection-sample: {len(prompts)} prompts x {cfg.k} samples | policy {loaded.path} ({template}) | "
           f"rm {cfg.rm} ({rm_template}) | T={cfg.temperature:g} top-p {cfg.top_p:g}")
    seed_everything(cfg.seed)
    t0 = time.perf_counter()
    rendered = render_prompts([p for _, p in prompts], loaded.tokenizer, template)
    engine = Engine(loaded.model, loaded.tokenizer, slots=cfg.slots, meta=loaded.meta,
                    max_seq_len=engine_context(rendered, cfg.max_new_tokens, loaded.model.cfg.max_seq_len))
    samples = sample_answers(engine, loaded.tokenizer, template, rendered, cfg.k, cfg.max_new_tokens,
                             cfg.temperature, cfg.top_p, cfg.seed, ledger, [w for w, _ in prompts],
                             chunk=max(1, 4 * cfg.slots // cfg.k))
    t_sample = time.perf_counter() - t0
    convs = [p + [{"role": "assistant", "content": s["text"]}] for (_, p), ss in zip(prompts, samples) if ss
             for s in ss]
    flat = score_texts(rm, rm_tok, rm_template, convs, cfg.batch_size) if convs else []
    rewards = [flat[i:i + cfg.k] for i in range(0, len(flat), cfg.k)]
    rows, kept, dropped = select_best(prompts, samples, rewards)
    curve = best_of_k_curve(rewards)
    run = RunDir(cfg.out)
    run.root.mkdir(parents=True, exist_ok=True)
    write_jsonl(run.rejection_samples, rows)
    write_jsonl(run.rejection_kept, kept)
    n = len(flat)
    summary = {"prompts": ledger.to_json(), "sampled_prompts": len(rows), "k": cfg.k, "samples": n,
               "kept": len(kept), "kept_dropped": dict(dropped),
               "mean_reward": sum(flat) / n if n else None,
               "mean_best_reward": sum(max(r) for r in rewards) / len(rewards) if rewards else None,
               "best_of_k": curve, "sample_seconds": t_sample, "seconds": time.perf_counter() - t0,
               "generated_tokens": sum(s["tokens"] for ss in samples if ss for s in ss),
               "samples_file": str(run.rejection_samples), "kept_file": str(run.rejection_kept)}
    write_json_atomic(run.rejection_summary, summary)
    write_meta(run, run_meta(to_dict(cfg), loaded.model.cfg, files_record(cfg.prompts), kind="rejection_sampling",
                             policy=base_record(loaded.path), rm=base_record(resolve_model_path(cfg.rm)),
                             template=template, rm_template=rm_template, device=str(device)))
    write_json_atomic(run.samples, [{"prompt": r["conversations"][-2]["value"] + "\n",
                                     "completion": f"{r['conversations'][-1]['value']}  [reward {r['reward']:.3f}]"}
                                    for r in kept[:5]])
    fig = curve_figure(curve, run.eval_file("best_of_k.png"))
    if fig is not None:
        write_json_atomic(run.eval_figures, {"rejection_sampling": [
            {"path": str(fig), "caption": f"best-of-K reward (expected max over k of {cfg.k} samples, mean over "
                                          f"{len(rewards)} prompts)"}]})
    from llamalab.report.html import write_report

    summary["report"] = str(write_report(run.root))
    pts = ", ".join(f"{c['k']}: {c['best_of_k']:.3f}" for c in curve)
    print0(f"rejection-sample: done | {len(rows)} prompts, {n} samples in {t_sample:.1f}s | mean reward "
           f"{summary['mean_reward'] if n else float('nan'):.3f}, best-of-K by K {{{pts}}} | {len(kept)} kept "
           f"({dict(dropped) or 'none dropped'}) -> {run.rejection_kept} | {summary['report']}")
    return summary


if __name__ == "__main__":
    from llamalab.cli import stage_main

    stage_main(Config, main)
