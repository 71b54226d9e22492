"""Generative tasks: closed-book QA exact match, GSM8K (answer extraction, maj@k), HumanEval (pass@k).

The scoring functions are pure and follow the published definitions:
- QA: SQuAD normalisation (lower case, strip punctuation and the articles a/an/the, collapse
  whitespace); exact match if the normalised prediction equals any normalised answer; also F1.
- GSM8K: ``strict`` takes the number after ``#### `` in the completion (the format of the
  few-shot solutions); ``flexible`` takes the last number in the completion (lm-eval's
  ``flexible-extract``). Numbers compare after removing ``,``, ``$`` and a trailing ``.``
  (``18.0`` equals ``18``). maj@k: the most frequent extracted answer among k samples (ties: the one
  seen first) compared with the target.
- HumanEval: pass@k with the unbiased estimator of Chen et al. 2021,
  ``1 - C(n-c, k) / C(n, k)`` computed as a stable product, averaged over problems; every
  completion runs in :mod:`llamalab.eval.sandbox` (OS isolation; a sample passes only when its
  program ran to the end, shown by the sandbox's per-run token, not by its exit status).

Generation is injected as a ``SampleFn(prompts, n, temperature) -> n completions per prompt``, so
the same code serves our model (:func:`model_sample_fn`) and tests with scripted completions.
Our model decodes through :class:`llamalab.inference.engine.Engine`, the sampler of ``generate`` and
``serve``: a completion here is the completion a user of the server gets for the same prompt and
settings (greedy: the step-by-step argmax, tested). The trade-off: the engine keeps a fused copy of
the weights and a KV cache of ``batch_size`` full-context rows for as long as a task is decoded.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from llamalab.common import Progress, print0
from llamalab.inference.sampling import SamplingParams

if TYPE_CHECKING:
    from llamalab.inference.engine import Engine

SampleFn = Callable[[list[str], int, float], list[list[str]]]

# ----------------------------------------------------------------------------- QA


def normalize_answer(s: str) -> str:
    """SQuAD / NaturalQuestions / TriviaQA answer normalisation."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def qa_exact_match(prediction: str, answers: Sequence[str]) -> float:
    p = normalize_answer(prediction)
    return float(any(p == normalize_answer(a) for a in answers))


def qa_f1(prediction: str, answers: Sequence[str]) -> float:
    def f1(pred: str, gold: str) -> float:
        p, g = normalize_answer(pred).split(), normalize_answer(gold).split()
        common = sum((Counter(p) & Counter(g)).values())
        if not p or not g:
            return float(p == g)
        if common == 0:
            return 0.0
        prec, rec = common / len(p), common / len(g)
        return 2 * prec * rec / (prec + rec)

    return max(f1(prediction, a) for a in answers)


# ----------------------------------------------------------------------------- GSM8K

_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
_NUMBER = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


def normalize_number(s: str) -> str:
    s = s.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        v = float(s)
    except ValueError:
        return s
    return str(int(v)) if v == int(v) and abs(v) < 1e15 else repr(v)


def extract_strict(completion: str) -> str | None:
    m = _STRICT.search(completion)
    return normalize_number(m.group(1)) if m else None


def extract_flexible(completion: str) -> str | None:
    found = [a or b for a, b in _NUMBER.findall(completion)]
    found = [f for f in found if any(ch.isdigit() for ch in f)]
    return normalize_number(found[-1]) if found else None


def majority(answers: Sequence[str | None]) -> str | None:
    """The most frequent non-empty answer; ties go to the one that appeared first."""
    votes = [a for a in answers if a is not None]
    if not votes:
        return None
    counts = Counter(votes)
    best = max(counts.values())
    return next(a for a in votes if counts[a] == best)


# ----------------------------------------------------------------------------- pass@k


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for n samples of which c are correct: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or k < 1 or k > n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


# ----------------------------------------------------------------------------- evaluation loops


def generate_texts(engine: Engine, prompts: Sequence[str], max_new_tokens: int, temperature: float = 0.0,
                   stop: Sequence[str] = (), top_p: float = 1.0, seed: int = 0) -> list[str]:
    """Continue each prompt (BOS first) through ``engine``; the generated text, cut before the first stop string.

    A prompt longer than the context keeps its last tokens (room is left for one new token); the
    ``i``-th prompt samples with seed ``seed + i``. Decoding ends at EOS, a stop string, ``max_new_tokens``
    or the end of the context."""
    if max_new_tokens < 1:
        return [""] * len(prompts)
    keep = engine.max_seq_len - 1
    ids = [engine.encode(p)[-keep:] for p in prompts]
    params = [SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed + i,
                             stop=[s for s in stop if s]) for i in range(len(prompts))]
    return [out.text for out in engine.generate(ids, params)]


def model_sample_fn(model, tokenizer, max_new_tokens: int, stop: Sequence[str], batch_size: int = 8,
                    seed: int = 0, top_p: float = 1.0) -> SampleFn:
    """Our model as a :data:`SampleFn` (greedy when temperature is 0), decoding ``batch_size`` rows at a time."""
    from llamalab.inference.engine import Engine

    engine = Engine(model, tokenizer, slots=batch_size)
    done = 0  # samples drawn so far: each sample gets its own seed

    def fn(prompts: list[str], n: int, temperature: float) -> list[list[str]]:
        nonlocal done
        flat = [p for p in prompts for _ in range(n)]
        out = generate_texts(engine, flat, max_new_tokens, temperature, stop, top_p, seed + done)
        done += len(flat)
        return [out[i * n:(i + 1) * n] for i in range(len(prompts))]

    return fn


def run_generation(sample_fn: SampleFn, prompts: list[str], n: int, temperature: float, label: str,
                   chunk: int = 8) -> list[list[str]]:
    bar = Progress(len(prompts), label, "prompt")
    out: list[list[str]] = []
    for b in range(0, len(prompts), chunk):
        out += sample_fn(prompts[b:b + chunk], n, temperature)
        bar.update(min(chunk, len(prompts) - b))
    bar.close()
    return out


def score_qa(completions: list[list[str]], answers: list[list[str]]) -> tuple[dict[str, float], list[dict[str, Any]]]:
    recs = []
    for comps, ans in zip(completions, answers):
        pred = comps[0].strip()
        recs.append({"prediction": pred, "answers": ans, "exact_match": qa_exact_match(pred, ans),
                     "f1": qa_f1(pred, ans)})
    n = len(recs)
    return {"exact_match": sum(r["exact_match"] for r in recs) / n, "f1": sum(r["f1"] for r in recs) / n}, recs


def score_gsm8k(completions: list[list[str]], targets: list[str]) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """exact_match (strict, flexible) of the first sample, and maj@k over all samples when k > 1."""
    recs = []
    for comps, tgt in zip(completions, targets):
        want = normalize_number(tgt)
        strict = [extract_strict(c) for c in comps]
        flex = [extract_flexible(c) for c in comps]
        rec = {"completion": comps[0], "target": want, "strict": strict[0], "flexible": flex[0],
               "exact_match_strict": float(strict[0] == want), "exact_match_flexible": float(flex[0] == want)}
        if len(comps) > 1:
            rec["majority"] = majority(flex)
            rec[f"maj@{len(comps)}"] = float(rec["majority"] == want)
            rec["samples"] = comps
        recs.append(rec)
    keys = [k for k in recs[0] if k.startswith(("exact_match", "maj@"))]
    return {k: sum(r[k] for r in recs) / len(recs) for k in keys}, recs


def score_humaneval(problems: list[dict], completions: list[list[str]], ks: Sequence[int] = (1, 10, 100),
                    timeout: float = 10.0, workers: int = 2, memory_mb: int = 1024, allow_unsandboxed: bool = False
                    ) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Run every completion's tests in the sandbox; pass@k for each k <= samples per problem.

    A sample passes only when its program ran to the end (the sandbox's completion token came back)
    with exit status 0. Without OS isolation the sandbox refuses to run unless ``allow_unsandboxed``
    (or ``LLAMALAB_ALLOW_UNSANDBOXED=1``)."""
    from llamalab.eval.sandbox import humaneval_program, require_isolation, run_python

    mode = require_isolation(allow_unsandboxed)  # refuse before any program runs
    jobs = [(i, j, humaneval_program(p, c)) for i, (p, comps) in enumerate(zip(problems, completions))
            for j, c in enumerate(comps)]
    bar = Progress(len(jobs), "humaneval tests", "program")
    results: dict[tuple[int, int], Any] = {}

    def one(job: tuple[int, int, str]) -> None:
        i, j, prog = job
        results[(i, j)] = run_python(prog, timeout=timeout, memory_mb=memory_mb, mode=mode)
        bar.update()

    with ThreadPoolExecutor(max_workers=max(1, workers)) as ex:
        list(ex.map(one, jobs))
    bar.close()
    broken = [r for r in results.values() if r.status == "error"]
    if broken:  # counted as failures, and said: a sandbox failure is not the model's
        print0(f"humaneval: warning: {len(broken)} of {len(jobs)} program(s) ended without a status from the "
               f"sandbox (counted as failed); first: {broken[0].detail}")
    recs = []
    for i, (p, comps) in enumerate(zip(problems, completions)):
        res = [results[(i, j)] for j in range(len(comps))]
        c = sum(r.passed for r in res)
        rec = {"task_id": p["task_id"], "n": len(comps), "correct": c, "sandbox": mode,
               "results": [{"status": r.status, "completion": comp, "stderr": r.stderr[-500:],
                            **({"detail": r.detail} if r.detail else {})} for r, comp in zip(res, comps)]}
        for k in ks:
            if k <= len(comps):
                rec[f"pass@{k}"] = pass_at_k(len(comps), c, k)
        recs.append(rec)
    metrics = {f"pass@{k}": sum(r[f"pass@{k}"] for r in recs) / len(recs) for k in ks if f"pass@{k}" in recs[0]}
    return metrics, recs
