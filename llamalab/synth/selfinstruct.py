"""Self-Instruct as Stanford Alpaca ran it: a model writes new instruction/input/output tasks from a few examples.

The method (Wang et al. 2022, "Self-Instruct: Aligning Language Models with Self-Generated
Instructions"; Taori et al. 2023, Stanford Alpaca's ``generate_instruction.py``):

1. Start from human-written seed tasks (the 175 of Self-Instruct/Alpaca).
2. Each request shows a few sampled tasks, ``num_seed_examples`` seed tasks plus up to
   ``num_generated_examples`` already generated ones (Alpaca: 3 seed, 0 generated; Self-Instruct: 6 + 2;
   default here 3 + 2), and asks for a numbered batch of ``batch_size`` new tasks. The prompt text is
   ours (:data:`PROMPT`), its sha256 goes into meta.json.
3. Replies are parsed into ``N. Instruction: / N. Input: / N. Output:`` triples
   (:func:`parse_tasks`); a missing or ``<noinput>`` input is an empty one; a block without an
   instruction or output, or cut off by the length limit, is counted as malformed with its reason.
4. Each triple passes Alpaca's filters in Alpaca's order: instruction of <= 3 or > 150 words; a
   banned keyword for things a text model cannot do (:data:`BANNED`, whole words, any case);
   starting with "Write a program" (Alpaca: the model over-produced them); starting with punctuation;
   not English (Alpaca: a first character outside ASCII; here also py3langid confidently naming
   another language); and ROUGE-L >= ``rouge_threshold`` (0.7) against any seed or kept instruction
   (:class:`llamalab.synth.rouge.RougeIndex`, equal to the ``rouge-score`` package). The paper's rule
   is "kept when below 0.7"; Alpaca's code rejects ``> 0.7``; the two differ only at exactly 0.7.
5. Kept tasks go to ``regen.json`` (Alpaca's file name and JSON format: ``llamalab sft --format
   alpaca`` reads it), each with its most similar instruction and that ROUGE-L; every rejection goes
   to ``ledger.json`` with its reason, detail and similarity; ``meta.json`` records the endpoint,
   model, prompt and seed hashes and the counts; ``report.html`` shows them.

Resuming: the run proceeds in rounds of ``requests_per_round`` requests; the kept tasks and the
ledger are written after each round, and a round's prompts depend only on the seed, the round
number and the tasks kept before it, so a rerun into the same folder rebuilds the interrupted
round's requests exactly and the client's cache answers the ones already sent.
"""

from __future__ import annotations

import hashlib
import html
import json
import random
import re
import string
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamalab.common import LlamalabError, Progress, iter_jsonl, print0, read_json, sha256_file, write_json_atomic
from llamalab.run_dir import RunDir
from llamalab.synth.client import ChatClient
from llamalab.synth.rouge import RougeIndex

REGEN = "regen.json"  # Alpaca's name for its generated data
LEDGER = "ledger.json"
CACHE = "cache"
BANNED = ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps", "draw",
          "plot", "go to", "video", "audio", "music", "flowchart", "diagram")
_BANNED_RE = [(w, re.compile(rf"\b{re.escape(w)}\b", re.IGNORECASE)) for w in BANNED]
MIN_WORDS, MAX_WORDS = 3, 150  # kept: MIN_WORDS < words <= MAX_WORDS (Alpaca)
NOINPUT = "<noinput>"

PROMPT = """You are asked to come up with {n} new, diverse tasks. They will be given to a language model, and we will \
judge how well it completes them, so they should teach it to follow instructions.

Requirements:
1. Vary the verbs and the kinds of task: open-ended generation, classification, editing, rewriting, question \
answering, brainstorming, reasoning, math, coding and so on.
2. Each instruction is in English, one or two sentences, either imperative or a question, and is not a copy \
of an example.
3. A text-only model must be able to do the task: nothing that needs seeing or making images, audio or video, \
reading files, or acting in the world.
4. Some tasks need an input: a concrete example of at most 100 words (not a placeholder). When a task needs \
none, write {noinput} as its input.
5. The output is a correct, complete answer of at most 100 words.

Here are some example tasks:

{examples}

Now write {n} new tasks in exactly the same format, numbered 1 to {n}, separated by lines of ###."""

_LABEL = re.compile(
    r"^[ \t>*#-]*(?:(?P<n1>\d+)\s*[.):]\s*)?[*_]{0,2}(?P<l1>(?i:instruction|input|output))s?[*_]{0,2}[ \t]*:[*_]{0,2}"
    r"|(?<=\s)(?:(?P<n2>\d+)\.\s*)?(?P<l2>Input|Output):", re.M)
_SEPARATOR = re.compile(r"^\s*#{3,}\s*$", re.M)


@dataclass
class Task:
    instruction: str
    input: str
    output: str

    def to_json(self) -> dict[str, str]:
        return {"instruction": self.instruction, "input": self.input, "output": self.output}


@dataclass
class Malformed:
    reason: str  # no_instruction | no_output | empty_instruction | empty_output | repeated_field | truncated
    text: str


def read_seed_tasks(path: str | Path) -> list[Task]:
    """Self-Instruct's seed file (JSONL of ``{instruction, instances: [{input, output}]}``): first instance each."""
    path = Path(path)
    if not path.exists():
        raise LlamalabError(f"seeds: {path} not found (the 175 seed tasks are stanford_alpaca's seed_tasks.jsonl)")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, rec in iter_jsonl(f, path):
            inst = rec.get("instances") if isinstance(rec, dict) else None
            if not isinstance(rec, dict) or not str(rec.get("instruction") or "").strip() \
                    or not isinstance(rec.get("instruction"), str):
                raise LlamalabError(f"{path}:{n}: a seed task needs a non-empty 'instruction' string")
            if not isinstance(inst, list) or not inst or not isinstance(inst[0], dict) \
                    or not isinstance(inst[0].get("output"), str):
                raise LlamalabError(f"{path}:{n}: 'instances' must be a list of {{input, output}} objects")
            inp = inst[0].get("input", "")
            if not isinstance(inp, str):
                raise LlamalabError(f"{path}:{n}: instances[0].input is not a string")
            out.append(Task(rec["instruction"].strip(), inp.strip(), inst[0]["output"].strip()))
    if not out:
        raise LlamalabError(f"seeds: {path} holds no tasks")
    return out


# ----------------------------------------------------------------------------- prompt and parsing


def format_examples(tasks: list[Task]) -> str:
    """The example tasks in the format the reply must follow (Alpaca's ``encode_prompt`` layout)."""
    blocks = []
    for i, t in enumerate(tasks, start=1):
        instruction = re.sub(r"\s+", " ", t.instruction).strip().rstrip(":")
        blocks.append(f"{i}. Instruction: {instruction}\n{i}. Input:\n{t.input or NOINPUT}\n{i}. Output:\n{t.output}")
    return "\n###\n".join(blocks) + "\n###"


def build_prompt(examples: list[Task], n: int) -> str:
    return PROMPT.format(n=n, noinput=NOINPUT, examples=format_examples(examples))


def prompt_sha256() -> str:
    return hashlib.sha256(PROMPT.encode("utf-8")).hexdigest()


def _clean(text: str) -> str:
    text = _SEPARATOR.sub("", text).strip()
    return re.sub(r"[ \t]*\n[ \t]*(?:\d+\.)?\s*$", "", text).strip()


def parse_tasks(text: str, truncated: bool = False) -> tuple[list[Task], list[Malformed]]:
    """Numbered Instruction/Input/Output triples out of a reply; the malformed blocks with their reason.

    A block starts at each ``Instruction:`` label (optionally numbered, optionally in ``**bold**``);
    ``Input:`` and ``Output:`` labels attach to it, on their own line or inline. With ``truncated``
    (the reply hit its token limit) the last block is counted as ``truncated``, as Alpaca drops it.
    """
    blocks: list[dict[str, str]] = []
    bad: list[Malformed] = []
    marks = list(_LABEL.finditer(text))
    orphan = text[:marks[0].start()] if marks else text
    for k, m in enumerate(marks):
        label = (m.group("l1") or m.group("l2")).lower()  # "Instructions:" counts as "Instruction:"
        end = marks[k + 1].start() if k + 1 < len(marks) else len(text)
        value = _clean(text[m.end():end])
        if label == "instruction":
            blocks.append({"instruction": value, "_raw": text[m.start():end]})
        elif not blocks:
            orphan += text[m.start():end]
        elif label in blocks[-1]:
            blocks[-1]["_repeated"] = label
            blocks[-1]["_raw"] += text[m.start():end]
        else:
            blocks[-1][label] = value
            blocks[-1]["_raw"] += text[m.start():end]
    if orphan.strip() and _LABEL.search(orphan):
        bad.append(Malformed("no_instruction", orphan.strip()))
    tasks = []
    for k, b in enumerate(blocks):
        raw = b["_raw"].strip()
        if truncated and k == len(blocks) - 1:
            bad.append(Malformed("truncated", raw))
        elif "_repeated" in b:
            bad.append(Malformed("repeated_field", raw))
        elif not b["instruction"]:
            bad.append(Malformed("empty_instruction", raw))
        elif "output" not in b:
            bad.append(Malformed("no_output", raw))
        elif not b["output"]:
            bad.append(Malformed("empty_output", raw))
        else:
            inp = b.get("input", "")
            inp = "" if inp.strip().lower() in (NOINPUT, "<no input>", "") else inp
            tasks.append(Task(b["instruction"], inp, b["output"]))
    if not blocks and not bad and text.strip():
        bad.append(Malformed("no_tasks", text.strip()))
    return tasks, bad


# ----------------------------------------------------------------------------- filters


def _is_english(text: str) -> tuple[bool, str]:
    from llamalab.data.filters import detect_language  # py3langid: the data / synth extra

    lang, prob = detect_language(text)
    return (lang == "en" or prob < 0.5), f"{lang} (p={prob:.2f})"


def rule_filter(instruction: str) -> tuple[str, str] | None:
    """(reason, detail) when Alpaca's rules reject ``instruction`` (before the similarity check), else None."""
    words = len(instruction.split())
    if words <= MIN_WORDS:
        return "too_short", f"{words} words (needs > {MIN_WORDS})"
    if words > MAX_WORDS:
        return "too_long", f"{words} words (at most {MAX_WORDS})"
    for w, rx in _BANNED_RE:
        if rx.search(instruction):
            return "banned_keyword", w
    if instruction.startswith("Write a program"):
        return "write_a_program", "starts with 'Write a program' (Alpaca)"
    if instruction[0] in string.punctuation:
        return "starts_with_punctuation", instruction[0]
    if not instruction[0].isascii():
        return "not_english", f"starts with {instruction[0]!r}"
    ok, lang = _is_english(instruction)
    if not ok:
        return "not_english", f"py3langid: {lang}"
    return None


class SimilarityFilter:
    """ROUGE-L of new instructions against the seeds and every kept one; times itself."""

    def __init__(self, pool: list[str], threshold: float) -> None:
        self.index = RougeIndex(pool)
        self.threshold = threshold
        self.seconds = 0.0
        self.checked = 0

    def check(self, instruction: str) -> tuple[float, str | None]:
        t0 = time.perf_counter()
        score, at = self.index.best(instruction)
        self.seconds += time.perf_counter() - t0
        self.checked += 1
        return score, (self.index.texts[at] if at is not None else None)

    def add(self, instruction: str) -> None:
        self.index.add(instruction)

    @property
    def rate(self) -> float:
        return self.checked / self.seconds if self.seconds else 0.0


# ----------------------------------------------------------------------------- the run


@dataclass
class State:
    """What the output folder holds between rounds."""

    kept: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)
    rounds: int = 0
    requests: int = 0
    cached: int = 0

    def ledger(self) -> dict:
        by_reason = Counter(r["reason"] for r in self.rejected)
        return {"rounds": self.rounds, "requests": self.requests, "requests_failed": len(self.failed),
                "candidates": self.counts["candidates"], "kept": len(self.kept),
                "rejected": sum(by_reason.values()), "rejected_by_reason": dict(sorted(by_reason.items())),
                "rejections": self.rejected, "failed_requests": self.failed}


def _load_state(out: Path) -> State:
    st = State()
    if (out / REGEN).exists():
        st.kept = read_json(out / REGEN, "Self-Instruct output")
        if not isinstance(st.kept, list):
            raise LlamalabError(f"{out / REGEN}: expected a JSON array of tasks")
    if (out / LEDGER).exists():
        led = read_json(out / LEDGER, "Self-Instruct ledger")
        st.rejected, st.failed = led.get("rejections", []), led.get("failed_requests", [])
        st.rounds, st.requests = int(led.get("rounds", 0)), int(led.get("requests", 0))
        st.counts["candidates"] = int(led.get("candidates", 0))
    return st


def _check_resume(out: Path, meta_path: Path, seeds_sha: str, cfg: Any) -> None:
    if not meta_path.exists():
        return
    old = read_json(meta_path, "meta.json")
    pairs = [("seeds_sha256", seeds_sha), ("prompt_sha256", prompt_sha256())]
    pairs += [(f"config.{k}", getattr(cfg, k)) for k in ("batch_size", "requests_per_round", "num_seed_examples",
                                                         "num_generated_examples", "seed", "temperature", "top_p",
                                                         "max_tokens", "rouge_threshold")]
    for key, now in pairs:
        was = old.get(key) if "." not in key else old.get("config", {}).get(key.split(".", 1)[1])
        if was is not None and was != now:
            raise LlamalabError(f"{meta_path}: this folder was made with {key}={was!r}, now {now!r}; resume with "
                                f"the same settings or choose another --out")


def sample_examples(rng: random.Random, seeds: list[Task], kept: list[dict], n_seed: int, n_gen: int) -> list[Task]:
    ex = rng.sample(seeds, min(n_seed, len(seeds)))
    if n_gen and kept:
        ex += [Task(d["instruction"], d.get("input", ""), d["output"]) for d in rng.sample(kept, min(n_gen, len(kept)))]
    return ex


def run_selfinstruct(cfg: Any) -> dict:
    """Generate until ``cfg.num_instructions`` tasks are kept (or ``cfg.max_requests`` are sent); returns meta."""
    out = Path(cfg.out)
    run = RunDir(out)
    seeds_path = Path(cfg.seeds)
    seeds = read_seed_tasks(seeds_path)
    seeds_sha = sha256_file(seeds_path)
    _check_resume(out, run.meta, seeds_sha, cfg)
    client = ChatClient(cfg, cache_dir=out / CACHE)  # checks the endpoint before anything is written
    out.mkdir(parents=True, exist_ok=True)
    st = _load_state(out)
    sim = SimilarityFilter([t.instruction for t in seeds] + [d["instruction"] for d in st.kept], cfg.rouge_threshold)
    max_requests = cfg.max_requests or 10 * -(-cfg.num_instructions // cfg.batch_size)
    t_start = time.perf_counter()
    resumed = (len(st.kept), st.requests)
    started = time.strftime("%Y-%m-%dT%H:%M:%S") + f"/{id(st):x}"
    _write_meta(run, cfg, client, st, seeds_path, seeds_sha, len(seeds), sim, 0.0, None, resumed, started)
    if st.kept or st.requests:
        print0(f"selfinstruct: resuming {out}: {len(st.kept)} kept, {len(st.rejected)} rejected after "
               f"{st.requests} requests ({st.rounds} rounds)")
    bar = Progress(max(0, cfg.num_instructions - len(st.kept)), f"selfinstruct (kept before: {len(st.kept)})"
                   if st.kept else "selfinstruct", "kept")
    stop_reason = "target reached"
    while len(st.kept) < cfg.num_instructions:
        if st.requests >= max_requests:
            stop_reason = f"max_requests ({max_requests}) reached"
            break
        n_req = min(cfg.requests_per_round, max_requests - st.requests)
        reqs = []
        for j in range(n_req):
            rng = random.Random(f"{cfg.seed}:{st.rounds}:{j}")  # depends only on the seed, round and request
            examples = sample_examples(rng, seeds, st.kept, cfg.num_seed_examples, cfg.num_generated_examples)
            params = {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": cfg.max_tokens,
                      "seed": cfg.seed * 1_000_003 + st.requests + j}
            reqs.append(([{"role": "user", "content": build_prompt(examples, cfg.batch_size)}], params))
        replies = client.chat_many(reqs)
        before = len(st.kept)
        for j, reply in enumerate(replies):
            rid = st.requests + j
            st.cached += reply.cached
            if not reply.ok:
                st.failed.append({"request": rid, "error": reply.error})
                continue
            tasks, bad = parse_tasks(reply.text, truncated=reply.finish_reason == "length")
            st.counts["candidates"] += len(tasks) + len(bad)
            for b in bad:
                st.rejected.append({"request": rid, "reason": f"malformed:{b.reason}", "text": b.text[:2000]})
            for t in tasks:
                rec: dict[str, Any] = {"request": rid, **t.to_json()}
                if len(st.kept) >= cfg.num_instructions:
                    st.rejected.append({**rec, "reason": "beyond_target", "detail": "the target was already reached"})
                    continue
                rule = rule_filter(t.instruction)
                if rule:
                    st.rejected.append({**rec, "reason": rule[0], "detail": rule[1]})
                    continue
                score, similar = sim.check(t.instruction)
                if score >= cfg.rouge_threshold:
                    st.rejected.append({**rec, "reason": "similar", "detail": f"ROUGE-L {score:.3f} >= "
                                        f"{cfg.rouge_threshold}", "rouge_l": score, "similar_to": similar})
                    continue
                sim.add(t.instruction)
                st.kept.append({**t.to_json(), "most_similar": similar, "rouge_l": round(score, 6), "request": rid})
        st.requests += n_req
        st.rounds += 1
        write_json_atomic(out / REGEN, st.kept)
        write_json_atomic(out / LEDGER, st.ledger())
        rejected = len(st.rejected)
        bar.update(len(st.kept) - before, f"kept {len(st.kept)}/{cfg.num_instructions} requests {st.requests} "
                                          f"rejected {rejected} failed {len(st.failed)} "
                                          f"({len(st.kept) / max(1, len(st.kept) + rejected):.0%} kept)")
        if all(not r.ok for r in replies):
            stop_reason = f"every request of round {st.rounds} failed ({replies[0].error})"
            break
    bar.close()
    seconds = time.perf_counter() - t_start
    meta = _write_meta(run, cfg, client, st, seeds_path, seeds_sha, len(seeds), sim, seconds, stop_reason, resumed,
                       started)
    write_selfinstruct_report(out)
    led = st.ledger()
    print0(f"selfinstruct: {len(st.kept)} kept, {led['rejected']} rejected "
           f"({', '.join(f'{k} {v}' for k, v in led['rejected_by_reason'].items()) or 'none'}), "
           f"{st.requests} requests ({len(st.failed)} failed, {client.stats['cache_hits']} from cache) in "
           f"{seconds:.1f} s; ROUGE-L filter {sim.rate:,.0f} instructions/s against {len(sim.index):,}; {stop_reason}")
    if stop_reason.startswith("every request"):
        raise LlamalabError(f"selfinstruct: {stop_reason}; {out} is saved, rerun the same command to resume")
    return meta


def _write_meta(run: RunDir, cfg: Any, client: ChatClient, st: State, seeds_path: Path, seeds_sha: str,
                n_seeds: int, sim: SimilarityFilter, seconds: float, stop_reason: str | None, resumed: tuple,
                started: str) -> dict:
    from dataclasses import asdict, is_dataclass

    from llamalab.common import git_sha

    conf = asdict(cfg) if is_dataclass(cfg) else dict(vars(cfg))
    conf.pop("api_key", None)
    led = st.ledger()
    # one entry per invocation (written at its start, completed at its end; an interrupted one stays with
    # "finished": null); the filter speed and client stats are summed over all of them
    history = (read_json(run.meta, "meta.json").get("invocations", []) if run.meta.exists() else [])
    history = [h for h in history if h.get("started") != started]
    history.append({"started": started, "finished": time.strftime("%Y-%m-%dT%H:%M:%S") if stop_reason else None,
                    "seconds": round(seconds, 2),
                    "kept_before": resumed[0], "kept_after": len(st.kept), "requests_before": resumed[1],
                    "requests_after": st.requests, "client_stats": dict(client.stats),
                    "filter_checked": sim.checked, "filter_seconds": round(sim.seconds, 4), "stop_reason": stop_reason})
    checked = sum(h["filter_checked"] for h in history)
    fsec = sum(h["filter_seconds"] for h in history)
    totals = {k: sum(h["client_stats"].get(k, 0) for h in history) for k in client.stats}
    meta = {"stage": "selfinstruct", "client": client.describe(), "client_stats": totals,
            "prompt_sha256": prompt_sha256(), "seeds": str(seeds_path), "seeds_sha256": seeds_sha,
            "n_seeds": n_seeds, "config": conf, "git_sha": git_sha(),
            "counts": {k: led[k] for k in ("rounds", "requests", "requests_failed", "candidates", "kept", "rejected",
                                           "rejected_by_reason")},
            "filter": {"instructions_checked": checked, "seconds": round(fsec, 4),
                       "instructions_per_s": round(checked / fsec, 1) if fsec else 0.0, "pool": len(sim.index)},
            "seconds": round(sum(h["seconds"] for h in history), 2), "stop_reason": stop_reason,
            "invocations": history, "files": {"data": REGEN, "ledger": LEDGER, "report": run.report.name}}
    write_json_atomic(run.meta, meta)
    return meta


# ----------------------------------------------------------------------------- report


def write_selfinstruct_report(out: str | Path) -> Path:
    """``report.html``: counts by reason (table and bar chart), similarity histogram, examples of each."""
    from llamalab.report.html import CSS, _png, _table

    run = RunDir(out)
    meta = read_json(run.meta, "meta.json")
    led = read_json(Path(out) / LEDGER, "Self-Instruct ledger")
    kept = read_json(Path(out) / REGEN, "Self-Instruct output")
    counts = meta["counts"]
    total = counts["kept"] + counts["rejected"]
    rows = [["kept", f"{counts['kept']:,}", f"{counts['kept'] / max(1, total):.1%}"]]
    rows += [[f"rejected: {k}", f"{v:,}", f"{v / max(1, total):.1%}"] for k, v in
             sorted(counts["rejected_by_reason"].items(), key=lambda kv: -kv[1])]
    rows += [["requests (failed)", f"{counts['requests']:,} ({counts['requests_failed']})", ""]]
    esc = html.escape
    c = meta["client"]
    f = meta["filter"]
    parts = [f"<h1>Self-Instruct: {esc(Path(out).resolve().name)}</h1>",
             f"<p class=sub>{esc(str(c['model']))} at {esc(c['endpoint'])} &middot; prompt sha256 "
             f"{meta['prompt_sha256'][:16]}… &middot; {meta['n_seeds']} seed tasks (sha256 "
             f"{meta['seeds_sha256'][:16]}…) &middot; git {esc(str(meta.get('git_sha')))}</p>",
             "<h2>Candidates by outcome</h2>", _table(["outcome", "count", "share"], rows),
             f"<p>ROUGE-L filter: {f['instructions_checked']:,} instructions checked against up to {f['pool']:,} "
             f"in {f['seconds']:.2f} s ({f['instructions_per_s']:,.0f} instructions/s).</p>"]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
        labels = ["kept"] + list(counts["rejected_by_reason"])
        values = [counts["kept"]] + list(counts["rejected_by_reason"].values())
        axes[0].barh(labels[::-1], values[::-1], color=["#c44"] * (len(labels) - 1) + ["#4a4"])
        axes[0].set_xlabel("candidates")
        sims = [d["rouge_l"] for d in kept if "rouge_l" in d] + [r["rouge_l"] for r in led["rejections"]
                                                                if "rouge_l" in r]
        axes[1].hist(sims, bins=20, range=(0, 1), color="#48c")
        axes[1].axvline(meta["config"].get("rouge_threshold", 0.7), color="#c44", ls="--")
        axes[1].set_xlabel("ROUGE-L with the most similar kept/seed instruction")
        axes[1].set_ylabel("candidates")
        parts.append(f'<figure><img alt="outcomes" src="{_png(fig)}"></figure>')
        plt.close(fig)
    except ImportError:
        parts.append("<p>(plots need matplotlib: pip install 'llamalab[report]')</p>")
    parts.append("<h2>Kept (first 10)</h2>" + _table(["instruction", "input", "output", "ROUGE-L"], [
        [d["instruction"], d.get("input", ""), d["output"][:300], d.get("rouge_l", "")] for d in kept[:10]]))
    by: dict[str, list[dict]] = {}
    for r in led["rejections"]:
        by.setdefault(r["reason"], []).append(r)
    for reason, rs in sorted(by.items()):
        parts.append(f"<h3>Rejected: {esc(reason)} ({len(rs)}; first 5)</h3>" + _table(
            ["instruction or text", "detail", "most similar"],
            [[r.get("instruction", r.get("text", ""))[:300], r.get("detail", ""), r.get("similar_to", "")]
             for r in rs[:5]]))
    if led.get("failed_requests"):
        parts.append("<h3>Failed requests</h3>" + _table(["request", "error"], [
            [r["request"], r["error"]] for r in led["failed_requests"][:20]]))
    parts.append("<h2>Config</h2><pre>" + esc(json.dumps(meta["config"], indent=2)) + "</pre>")
    page = (f"<!doctype html><html><head><meta charset=utf-8><title>llamalab selfinstruct</title>"
            f"<style>{CSS}</style></head><body>{''.join(parts)}</body></html>")
    tmp = run.report.with_suffix(".html.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(run.report)
    return run.report
