"""The chat recipe (``llamalab recipe chat``): a base model through the post-training chain of Llama 2 / Zephyr,
one resumable command.

Steps, each a run folder of its own under ``--out`` (the stage commands' ``Config`` + ``main()``, called in this
process, never through a subprocess):

  ``sft/``   LoRA SFT on the SFT files, one sub-run per file in order (``sft/1-alpaca``, ``sft/2-sharegpt``: a
             stage reads one format), each starting from the previous one's model
  ``rm/``    the reward model, from the SFT model, on the preference pairs (held-out prompts by a seeded hash)
  ``dpo/``   DPO from the SFT model on the same pairs (the same held-out prompts)
  ``ppo/``   a short PPO round from the DPO model against the reward model, on the *training* prompts only
  ``release/`` the release bundle of the last step's run

Then every policy (``start`` = the base, ``sft``, ``dpo``, ``ppo``) gets the same evaluation
(:func:`evaluate_step`): the multiple-choice benchmarks on a seeded sample of ``--eval.limit`` items of each task
file, written once to ``eval_items/`` (accuracy and its standard error), the mean reward-model score of its
greedy answers to held-out preference prompts, and the pairwise judge against the start in both orders; the reward
model's step gets its held-out accuracy. A step whose model folder exists is skipped on a rerun, an evaluation
whose ``recipe_eval.json`` exists is read back; a step folder with checkpoints but no model is a half-done run:
``--resume`` continues it. ``recipe.json`` records the steps, folders, wall times and figures; ``report.html``
sets them side by side.

The library takes the stage commands as arguments (:class:`Stages`): library code never imports a command.
"""

from __future__ import annotations

import gzip
import html
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamalab.common import LlamalabError, print0, write_json_atomic
from llamalab.config import from_dict
from llamalab.run_dir import RunDir

DATA = "../shared/data"
DEFAULT_SFT = [f"{DATA}/sft/alpaca_5000.json.gz", f"{DATA}/sft/sharegpt_sample.jsonl.gz"]
DEFAULT_PREFERENCE = [f"{DATA}/preference/hh_rlhf_harmless_test.jsonl.gz"]
DEFAULT_QUESTIONS = f"{DATA}/judge/vicuna80_question.jsonl"
DEFAULT_TASKS = {
    "arc_easy": f"{DATA}/eval/arc/ARC-Easy-Dev.jsonl",
    "arc_challenge": f"{DATA}/eval/arc/ARC-Challenge-Test_1150of1172.jsonl",
    "hellaswag": f"{DATA}/eval/hellaswag_100.jsonl",
    "mmlu": f"{DATA}/eval/mmlu.jsonl.gz",
    "truthfulqa_mc1": f"{DATA}/eval/truthfulqa_mc1_100.jsonl",
}
TRAIN_STEPS = ("sft", "rm", "dpo", "ppo")
POLICIES = ("start", "sft", "dpo", "ppo")  # the models every evaluation runs on
START_NAME, STEP_NAME = "start", "step"  # the two models' names in a judge run


@dataclass
class StepKnobs:
    """One training step's size and learning rate; anything else through ``overrides``."""

    limit: int = field(default=0, metadata={"help": "records read (0: all)"})
    steps: int = field(default=0, metadata={"help": "optimizer steps, PPO: iterations (0: the stage's default)"})
    lr: float = field(default=0.0, metadata={"help": "peak learning rate (0: the stage's default)"})
    batch_size: int = field(default=0, metadata={"help": "pairs/rows per step, PPO: rollout prompts (0: default)"})
    overrides: str = field(default="", metadata={"help": "JSON object of the stage's own Config fields, applied "
                                                         "last, e.g. '{\"beta\": 0.05}'"})

    def validate(self, name: str) -> None:
        if min(self.limit, self.steps, self.batch_size) < 0 or self.lr < 0:
            raise LlamalabError(f"--{name}.limit/steps/batch-size/lr must be >= 0")
        self.override_dict(name)

    def override_dict(self, name: str) -> dict[str, Any]:
        if not self.overrides:
            return {}
        try:
            d = json.loads(self.overrides)
        except json.JSONDecodeError as e:
            raise LlamalabError(f"--{name}.overrides: not JSON ({e})") from None
        if not isinstance(d, dict):
            raise LlamalabError(f"--{name}.overrides: expected a JSON object, got {type(d).__name__}")
        return d


@dataclass
class PPOKnobs(StepKnobs):
    """The PPO step's knobs: a short round by default (steps are iterations)."""

    steps: int = field(default=10, metadata={"help": "PPO iterations (0: the stage's default, 100)"})


@dataclass
class EvalKnobs:
    """The evaluation every policy gets (module docstring)."""

    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS), metadata={
        "help": "multiple-choice tasks (comma-separated; '' for none)"})
    paths: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS.values()), metadata={
        "help": "a data file per task, same order"})
    limit: int = field(default=200, metadata={"help": "items per task: a seeded sample of N, the same at every step "
                                                      "(0: all)"})
    batch_size: int = 16
    rm_prompts: int = field(default=100, metadata={"help": "held-out preference prompts answered and scored by the "
                                                           "reward model (0: skip)"})
    max_new_tokens: int = field(default=128, metadata={"help": "answer length for the RM score and the judge"})
    judge_questions: int = field(default=80, metadata={"help": "judge questions vs the start (0: no judge)"})
    judge: str = field(default="", metadata={"help": "the judge model (local path, likelihood verdicts; "
                                                     "default: the base model)"})
    bootstrap: int = field(default=200, metadata={"help": "bootstrap rounds of the judge's ratings"})

    def validate(self) -> None:
        self.tasks = [t for t in self.tasks if t]
        self.paths = [p for p in self.paths if p]
        if len(self.tasks) != len(self.paths):
            raise LlamalabError(f"--eval.paths: {len(self.paths)} file(s) for {len(self.tasks)} task(s) "
                                f"({', '.join(self.tasks)}); give one per task")
        if min(self.limit, self.rm_prompts, self.judge_questions, self.max_new_tokens, self.batch_size) < 0:
            raise LlamalabError("--eval.*: sizes must be >= 0")


@dataclass
class Stages:
    """The stage commands the recipe calls: each a (Config class, main) pair (passed in by the command module)."""

    sft: tuple[type, Callable]
    rm: tuple[type, Callable]
    dpo: tuple[type, Callable]
    ppo: tuple[type, Callable]
    eval_run: tuple[type, Callable]
    judge: tuple[type, Callable]
    release: tuple[type, Callable]


def sft_format(path: str | Path) -> str:
    """``alpaca`` or ``sharegpt`` by the first record of a JSON array or JSONL file (.gz ok)."""
    p = Path(path)
    if not p.is_file():
        raise LlamalabError(f"{p}: SFT data file not found")
    opener = gzip.open if p.suffix == ".gz" else open
    with opener(p, "rt", encoding="utf-8") as f:
        head = f.read(1 << 16).lstrip()
        if not head:
            raise LlamalabError(f"{p}: empty SFT data file")
        if head.startswith("["):
            f.seek(0)
            recs = json.load(f)
            first = recs[0] if recs else {}
        else:
            try:
                first = json.loads(head.splitlines()[0])
            except json.JSONDecodeError as e:
                raise LlamalabError(f"{p}:1: not a JSON record ({e})") from None
    if isinstance(first, dict) and "instruction" in first:
        return "alpaca"
    if isinstance(first, dict) and ("conversations" in first or "messages" in first):
        return "sharegpt"
    raise LlamalabError(f"{p}:1: neither Alpaca (instruction/output) nor ShareGPT (conversations) records")


def _knob_fields(k: StepKnobs, steps_key: str = "steps", batch_key: str = "batch_size") -> dict[str, Any]:
    d: dict[str, Any] = {}
    if k.limit:
        d["limit"] = k.limit
    if k.steps:
        d[steps_key] = k.steps
    if k.batch_size:
        d[batch_key] = k.batch_size
    return d


def _with_lr(d: dict[str, Any], k: StepKnobs) -> dict[str, Any]:
    if k.lr:
        d.setdefault("optim", {})["lr"] = k.lr
    return d


def _merge(d: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    for key, v in extra.items():
        if isinstance(v, dict) and isinstance(d.get(key), dict):
            _merge(d[key], v)
        else:
            d[key] = v
    return d


def _done(folder: Path) -> bool:
    return (RunDir(folder).model / "config.json").is_file()


def _call(name: str, stage: tuple[type, Callable], values: dict[str, Any]) -> Any:
    cls, main = stage
    cfg = from_dict(cls, values, where=f"recipe step {name}")
    return main(cfg)


class Recipe:
    """The record of one recipe folder (``recipe.json``), kept on disk after every step."""

    def __init__(self, out: Path, base: str) -> None:
        self.run = RunDir(out)
        self.run.root.mkdir(parents=True, exist_ok=True)
        old = json.loads(self.run.recipe.read_text()) if self.run.recipe.is_file() else {}
        self.record: dict[str, Any] = {"base": base, "out": str(out), "steps": old.get("steps", {})}
        self.runs_this_time: list[str] = []

    def step(self, name: str) -> dict[str, Any]:
        return self.record["steps"].setdefault(name, {"name": name})

    def save(self) -> None:
        write_json_atomic(self.run.recipe, self.record)


def run_training_step(rec: Recipe, name: str, folder: Path, stage: tuple[type, Callable], values: dict[str, Any],
                      resume: bool) -> Path:
    """Run one stage into ``folder`` unless its model folder exists (then skip); returns the model folder."""
    row = rec.step(name)
    row["folder"] = str(folder)
    if _done(folder):
        print0(f"recipe: {name}: done before ({folder}), skipped")
        return RunDir(folder).model
    half = RunDir(folder).checkpoints.is_dir()
    if half and not resume:
        raise LlamalabError(f"recipe: {folder} holds a half-done {name} run (checkpoints, no model/): rerun with "
                            "--resume to continue it, or remove the folder")
    print0(f"recipe: {name}: {'resuming' if half else 'running'} -> {folder}")
    t0 = time.perf_counter()
    _call(name, stage, {**values, "resume": bool(half)})
    row["seconds"] = row.get("seconds", 0.0) + time.perf_counter() - t0
    rec.runs_this_time.append(name)
    rec.save()
    if not _done(folder):
        raise LlamalabError(f"recipe: {name} stopped before writing {RunDir(folder).model} (a --stop-after or "
                            "--max-seconds in its overrides?); rerun with --resume")
    print0(f"recipe: {name}: done in {row['seconds']:.1f}s")
    return RunDir(folder).model


def _heldout(pref: list[str], fraction: float, seed: int, limit: int) -> tuple[list[Any], list[Any]]:
    from llamalab.align.data import read_preferences, split_by_prompt

    pairs, _ = read_preferences(pref, "auto", limit, "skip")
    return split_by_prompt(pairs, fraction, seed)


def write_train_prompts(path: Path, pairs: list[Any]) -> Path:
    """The distinct prompts of ``pairs`` as ``{"messages": [...]}`` JSONL (what ``llamalab ppo --data`` reads)."""
    seen, lines = set(), []
    for p in pairs:
        key = json.dumps(p.prompt, sort_keys=True)
        if key not in seen:
            seen.add(key)
            lines.append(json.dumps({"messages": p.prompt}))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(x + "\n" for x in lines), encoding="utf-8")
    return path


def mean_se(xs: list[float]) -> tuple[float | None, float | None]:
    """Mean and standard error of the mean (sample standard deviation / sqrt(n))."""
    n = len(xs)
    if not n:
        return None, None
    m = sum(xs) / n
    if n < 2:
        return m, None
    var = sum((x - m) ** 2 for x in xs) / (n - 1)
    return m, math.sqrt(var / n)


def rm_accuracy(rm_folder: Path, held: list[Any], device: str) -> dict[str, Any]:
    """The reward model's accuracy (chosen scored above rejected) on held-out pairs, with its standard error."""
    from llamalab.align.reward import load_reward_model, score_texts
    from llamalab.tokenizer.templates import resolve_template

    rm, tok, meta = load_reward_model(rm_folder, device=device)
    template = resolve_template(meta)
    chosen = score_texts(rm, tok, template, [p.prompt + [{"role": "assistant", "content": p.chosen}] for p in held])
    rejected = score_texts(rm, tok, template,
                           [p.prompt + [{"role": "assistant", "content": p.rejected}] for p in held])
    hits = [1.0 if c > r else 0.0 for c, r in zip(chosen, rejected)]
    acc, se = mean_se(hits)
    return {"accuracy": acc, "accuracy_stderr": se, "pairs": len(hits)}


def rm_score_of_answers(model: Path, rm_folder: Path, prompts: list[list[dict]], max_new_tokens: int, seed: int,
                        device: str) -> dict[str, Any]:
    """The policy's greedy answers to ``prompts``, scored by the reward model: mean ± standard error, a few
    samples; prompts too long for the context are counted, not scored."""
    from llamalab.align.data import PromptLedger
    from llamalab.align.rejection import engine_context, render_prompts, sample_answers
    from llamalab.align.reward import load_reward_model, score_texts
    from llamalab.common import resolve_device
    from llamalab.inference.engine import Engine
    from llamalab.model.folder import load
    from llamalab.tokenizer.templates import resolve_template

    dev = resolve_device(device)
    loaded = load(model, device=dev)
    template = resolve_template(loaded.meta)
    ids = render_prompts(prompts, loaded.tokenizer, template)
    engine = Engine(loaded.model, loaded.tokenizer, slots=8, meta=loaded.meta,
                    max_seq_len=engine_context(ids, max_new_tokens, loaded.model.cfg.max_seq_len))
    ledger = PromptLedger()
    answers = sample_answers(engine, loaded.tokenizer, template, ids, 1, max_new_tokens, 0.0, 1.0, seed, ledger)
    del engine, loaded
    convs = [p + [{"role": "assistant", "content": a[0]["text"]}] for p, a in zip(prompts, answers) if a]
    rm, tok, meta = load_reward_model(rm_folder, device=dev)
    scores = score_texts(rm, tok, resolve_template(meta), convs) if convs else []
    m, se = mean_se(scores)
    return {"mean_rm_score": m, "mean_rm_score_stderr": se, "answered": len(convs),
            "skipped": {"prompt_too_long": len(prompts) - len(convs)},
            "samples": [{"prompt": c[-2]["content"], "answer": c[-1]["content"], "score": s}
                        for c, s in list(zip(convs, scores))[:3]]}


def eval_subset(path: str | Path, n: int, seed: int, dest: Path) -> Path:
    """A fixed seeded sample of ``n`` records of a JSONL task file (file order kept), written once to ``dest`` and
    read back on later calls, so every step is scored on the same items; ``n`` 0 or the whole file: the file. A
    record without an id gets the one the task reader would give it in the full file (``name:line``), so the
    choice shuffle and the few-shot pool (the full file) know it."""
    import random

    from llamalab.eval.tasks import read_records

    if dest.is_file():
        return dest
    recs = read_records(Path(path))
    if not n or n >= len(recs):
        return Path(path)
    keep = sorted(random.Random(seed).sample(range(len(recs)), n))
    lines = []
    for i in keep:
        line, rec = recs[i]
        if "id" not in rec and "task_id" not in rec:
            rec = {"id": f"{Path(path).name}:{line}", **rec}
        lines.append(json.dumps(rec, ensure_ascii=False))
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".tmp")
    tmp.write_text("".join(x + "\n" for x in lines), encoding="utf-8")
    tmp.replace(dest)
    return dest


def _benchmarks(results: list[dict[str, Any]]) -> dict[str, Any]:
    out = {}
    for r in results:
        m = r.get("metrics", r)
        key = "acc_norm" if "acc_norm" in m and r.get("task", "") == "hellaswag" else "acc"
        out[r.get("task", "?")] = {"metric": key, "value": m.get(key), "stderr": m.get(f"{key}_stderr"),
                                   "n": r.get("n")}
    return out


def _judge_row(results: dict[str, Any]) -> dict[str, Any] | None:
    for key, row in results.get("pairwise", {}).items():
        a, _, b = key.partition(" vs ")
        if {a, b} == {START_NAME, STEP_NAME}:
            w, t, lo = row["win"], row["tie"], row["loss"]
            if a == START_NAME:
                w, lo = lo, w
            return {"win": w, "tie": t, "loss": lo, "unparsable": row.get("unparsable", 0)}
    return None


def evaluate_step(cfg: Any, stages: Stages, name: str, model: Path, folder: Path, rm_folder: Path,
                  held: list[Any], start_answers: Path | None = None) -> dict[str, Any]:
    """The evaluation of one policy (module docstring), read back from ``folder/recipe_eval.json`` when there.
    ``start_answers``: the start's judge answers from an earlier step (reused when the file exists)."""
    run = RunDir(folder)
    if run.recipe_eval.is_file():
        print0(f"recipe: eval {name}: done before, read back")
        return json.loads(run.recipe_eval.read_text())
    ev: EvalKnobs = cfg.eval
    print0(f"recipe: eval {name}: {model}")
    t0 = time.perf_counter()
    out: dict[str, Any] = {"model": str(model)}
    if ev.tasks:
        items = [str(eval_subset(p, ev.limit, cfg.seed, Path(cfg.out) / "eval_items" / f"{t}.jsonl"))
                 for t, p in zip(ev.tasks, ev.paths)]
        res = _call(f"eval {name}", stages.eval_run, {
            "model": str(model), "task": ev.tasks, "path": items, "fewshot_path": list(ev.paths),
            "batch_size": ev.batch_size, "output": str(run.eval), "device": cfg.device, "seed": cfg.seed})
        out["benchmarks"] = _benchmarks(res)
    if ev.rm_prompts:
        seen, prompts = set(), []
        for p in held:
            key = json.dumps(p.prompt, sort_keys=True)
            if key not in seen and len(prompts) < ev.rm_prompts:
                seen.add(key)
                prompts.append(p.prompt)
        out["rm_score"] = rm_score_of_answers(model, rm_folder, prompts, ev.max_new_tokens, cfg.seed, cfg.device)
    if ev.judge_questions and name != START_NAME:
        judge = ev.judge or cfg.base
        # the start's answers are the same at every step (greedy, same seed): written once, then read back
        start = [f"{START_NAME}={start_answers}"] if start_answers is not None and start_answers.is_file() else []
        res = _call(f"judge {name}", stages.judge, {
            "base_url": f"local:{judge}", "verdict": "likelihood", "questions": cfg.questions,
            "models": ([] if start else [f"{START_NAME}={cfg.base}"]) + [f"{STEP_NAME}={model}"],
            "answers": start, "baseline": START_NAME,
            "mode": "pairwise", "limit": ev.judge_questions, "max_tokens": ev.max_new_tokens,
            "temperature": 0.0, "seed": cfg.seed, "bootstrap": ev.bootstrap, "out": str(folder / "judge")})
        out["judge"] = _judge_row(res["results"])
    out["seconds"] = time.perf_counter() - t0
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run.recipe_eval, out)
    return out


def run_chat_recipe(cfg: Any, stages: Stages) -> dict[str, Any]:
    """``llamalab recipe chat`` (module docstring). ``cfg`` is the command's Config."""
    out = Path(cfg.out)
    rec = Recipe(out, cfg.base)
    lora = {"rank": cfg.lora_rank} if cfg.lora_rank else {}
    common = {"device": cfg.device, "seed": cfg.seed}
    t_all = time.perf_counter()

    # SFT: one sub-run per file (a stage reads one format), chained
    model: Path = Path(cfg.base)
    sft_root = out / "sft"
    for i, path in enumerate(cfg.sft_data, 1):
        fmt = sft_format(path)
        folder = sft_root / f"{i}-{fmt}"
        values = _merge(_with_lr({**common, **_knob_fields(cfg.sft), "base": str(model), "data": [str(path)],
                                  "format": fmt, "run_dir": str(folder), "lora": dict(lora)}, cfg.sft),
                        cfg.sft.override_dict("sft"))
        model = run_training_step(rec, "sft" if len(cfg.sft_data) == 1 else f"sft{i}", folder, stages.sft, values,
                                  cfg.resume)
    sft_model = model
    rec.step("sft").update({"folder": str(sft_root if len(cfg.sft_data) > 1 else folder), "model": str(sft_model)})
    if len(cfg.sft_data) > 1:
        rec.step("sft")["seconds"] = sum(rec.step(f"sft{i}").get("seconds", 0.0)
                                         for i in range(1, len(cfg.sft_data) + 1))

    pref = {"data": list(cfg.preference_data), "heldout_fraction": cfg.heldout_fraction}
    rm_folder = run_training_step(rec, "rm", out / "rm", stages.rm, _merge(_with_lr(
        {**common, **_knob_fields(cfg.rm), **pref, "base": str(sft_model), "run_dir": str(out / "rm"),
         "lora": dict(lora)}, cfg.rm), cfg.rm.override_dict("rm")), cfg.resume)
    rec.step("rm")["model"] = str(rm_folder)
    dpo_model = run_training_step(rec, "dpo", out / "dpo", stages.dpo, _merge(_with_lr(
        {**common, **_knob_fields(cfg.dpo), **pref, "base": str(sft_model), "run_dir": str(out / "dpo"),
         "lora": dict(lora)}, cfg.dpo), cfg.dpo.override_dict("dpo")), cfg.resume)
    rec.step("dpo")["model"] = str(dpo_model)

    # the held-out split the RM and DPO used (same file, fraction and seed): PPO trains on the other prompts
    limit = max(cfg.rm.limit, cfg.dpo.limit) if cfg.rm.limit and cfg.dpo.limit else 0
    train_pairs, held = _heldout(cfg.preference_data, cfg.heldout_fraction, cfg.seed, limit)
    ppo_knobs = {"limit": cfg.ppo.limit, "iterations": cfg.ppo.steps}
    ppo_values: dict[str, Any] = {**common, **{k: v for k, v in ppo_knobs.items() if v}, "policy": str(dpo_model),
                                  "reward_model": [str(rm_folder)], "run_dir": str(out / "ppo"), "lora": dict(lora)}
    if cfg.ppo.batch_size:
        ppo_values["ppo"] = {"rollout_batch": cfg.ppo.batch_size, "minibatch": cfg.ppo.batch_size}
    if not _done(out / "ppo"):
        ppo_values["data"] = [str(write_train_prompts(out / "ppo_prompts.jsonl", train_pairs))]
    else:
        ppo_values["data"] = [str(out / "ppo_prompts.jsonl")]
    ppo_model = run_training_step(rec, "ppo", out / "ppo", stages.ppo,
                                  _merge(_with_lr(ppo_values, cfg.ppo), cfg.ppo.override_dict("ppo")), cfg.resume)
    rec.step("ppo")["model"] = str(ppo_model)
    rec.save()

    # the same evaluation at every policy; the reward model's held-out accuracy at its step
    rm_row = rec.step("rm")
    if "figures" not in rm_row:
        rm_row["figures"] = {"rm": rm_accuracy(rm_folder, held, cfg.device)}
        rec.save()
    models = {"start": Path(cfg.base), "sft": sft_model, "dpo": dpo_model, "ppo": ppo_model}
    folders = {"start": out / "start", "sft": sft_root, "dpo": out / "dpo", "ppo": out / "ppo"}
    from llamalab.eval.judge import answers_path

    start_answers = None
    for name in POLICIES:
        rec.step(name).setdefault("folder", str(folders[name]))
        rec.step(name)["model"] = str(models[name])
        rec.step(name)["figures"] = evaluate_step(cfg, stages, name, models[name], folders[name], rm_folder, held,
                                                  start_answers)
        if name != START_NAME and start_answers is None:
            start_answers = answers_path(folders[name] / "judge", START_NAME)
        rec.save()

    if cfg.release:
        rel = out / "release"
        row = rec.step("release")
        row["folder"] = str(rel)
        if rel.is_dir() and any(rel.iterdir()):
            print0(f"recipe: release: done before ({rel}), skipped")
        else:
            t0 = time.perf_counter()
            _call("release", stages.release, {"run": str(out / "ppo"), "output": str(rel), "gguf": cfg.release_gguf})
            row["seconds"] = time.perf_counter() - t0
            rec.runs_this_time.append("release")
        rec.save()
    report = write_recipe_report(rec.run.report, rec.record)
    print0(recipe_markdown(rec.record))
    print0(f"recipe: done in {time.perf_counter() - t_all:.1f}s | ran {', '.join(rec.runs_this_time) or 'nothing'} "
           f"(the rest was done before) | {rec.run.recipe} | {report}")
    return {**rec.record, "ran": rec.runs_this_time, "report": str(report)}


def _fmt(v: Any, se: Any = None, pct: bool = False) -> str:
    if v is None:
        return "&ndash;"
    s = f"{100 * v:.1f}" if pct else f"{v:.3f}"
    if se is not None:
        s += f" &plusmn; {100 * se:.1f}" if pct else f" &plusmn; {se:.3f}"
    return s


def recipe_table(record: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The report's table: one row per step (start, sft, rm, dpo, ppo, release) and its figures as HTML cells."""
    steps = record["steps"]
    tasks: list[str] = []
    for name in POLICIES:
        for t in steps.get(name, {}).get("figures", {}).get("benchmarks", {}):
            if t not in tasks:
                tasks.append(t)
    head = ["step", *tasks, "RM acc", "mean RM score", "judge W/T/L vs start", "train (s)", "eval (s)"]
    rows = []
    for name in ("start", "sft", "rm", "dpo", "ppo", "release"):
        row = steps.get(name)
        if row is None:
            continue
        f = row.get("figures", {})
        bench = f.get("benchmarks", {})
        cells = [html.escape(name)]
        for t in tasks:
            b = bench.get(t)
            cells.append(_fmt(b["value"], b["stderr"], pct=True) if b else "&ndash;")
        rm = f.get("rm")
        cells.append(_fmt(rm["accuracy"], rm["accuracy_stderr"], pct=True) if rm else "&ndash;")
        sc = f.get("rm_score")
        cells.append(_fmt(sc["mean_rm_score"], sc["mean_rm_score_stderr"]) if sc else "&ndash;")
        j = f.get("judge")
        cells.append(f"{j['win']}/{j['tie']}/{j['loss']}" if j else "&ndash;")
        cells.append(f"{row['seconds']:.0f}" if row.get("seconds") is not None else "&ndash;")
        cells.append(f"{f['seconds']:.0f}" if f.get("seconds") is not None else "&ndash;")
        rows.append(cells)
    return head, rows


def write_recipe_report(path: Path, record: dict[str, Any]) -> Path:
    """``report.html``: the steps side by side (benchmarks ± standard error in %, RM accuracy, mean RM score of
    the policy's answers, judge win/tie/loss against the start, wall time)."""
    head, rows = recipe_table(record)
    th = "".join(f"<th>{h}</th>" for h in head)
    trs = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    doc = (f"<!doctype html><html><head><meta charset='utf-8'><title>chat recipe</title><style>"
           "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
           "padding:4px 8px;text-align:right}</style></head><body>"
           f"<h1>Chat recipe: {html.escape(str(record.get('base', '')))}</h1>"
           "<p>Benchmarks: accuracy in % &plusmn; standard error on the same items at every step. RM acc: the "
           "reward model's held-out pair accuracy. Mean RM score: its score of the step's greedy answers to held-out "
           "prompts. Judge: wins/ties/losses against the start (both orders).</p>"
           f"<table><tr>{th}</tr>{trs}</table></body></html>")
    path.write_text(doc, encoding="utf-8")
    path.with_suffix(".md").write_text(recipe_markdown(record), encoding="utf-8")
    return path


def recipe_markdown(record: dict[str, Any]) -> str:
    """The report's table as Markdown (``report.md``, printed at the end of a run): paste it into a README."""
    head, rows = recipe_table(record)
    plain = [[html.unescape(c) for c in r] for r in rows]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in plain]
    return "\n".join(lines) + "\n"
