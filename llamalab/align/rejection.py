"""Rejection sampling (Llama 2, Touvron et al. 2023b, section 3.2.3): K answers per prompt, keep the best.

For each prompt the policy samples K answers with :class:`llamalab.inference.Engine` (batched, each sample its
own seed), the reward model scores every one (:func:`llamalab.align.reward.score_texts`, with the reward model's
own tokenizer and chat template), and the highest-scoring answer is kept as a new SFT example. Llama 2 then
fine-tunes on the kept set; here that is ``llamalab sft --format sharegpt --data OUT/kept.jsonl``.

The best-of-K curve (Llama 2, Figure 7): for k = 1..K, the expected maximum reward over a random k-subset of a
prompt's K samples, averaged over prompts. With the K rewards sorted, ``r_(1) <= ... <= r_(K)``, the maximum of a
random k-subset is ``r_(i)`` with probability ``C(i-1, k-1) / C(K, k)`` (:func:`expected_best_of`); k = 1 is the
mean reward of one sample, k = K the best of all K. The gap between the two is what rejection sampling buys.

Prompts (:func:`llamalab.align.data.read_prompts`, as PPO reads them): preference files (``pairs`` or HH-RLHF; each
distinct prompt once) or prompt records ``{"prompt": str | messages}`` / ``{"messages": [... ending with a user
turn]}``. Duplicates are counted and sampled once; a prompt whose rendering leaves no room for an answer in the
policy's context is dropped with a reason; a best answer that is empty is not written to the kept set (counted).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llamalab.align.data import PromptLedger
from llamalab.common import Progress


def expected_best_of(rewards: Sequence[float], k: int) -> float:
    """E[max of a uniformly random k-subset of ``rewards``] (without replacement; exact)."""
    n = len(rewards)
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    r = sorted(rewards)
    total = math.comb(n, k)
    return sum(r[i] * math.comb(i, k - 1) for i in range(k - 1, n)) / total


def best_of_k_curve(rewards: Sequence[Sequence[float]]) -> list[dict[str, float]]:
    """For k = 1..K: the expected best-of-k reward averaged over prompts (and the mean reward for reference)."""
    if not rewards:
        return []
    K = min(len(r) for r in rewards)
    return [{"k": k, "best_of_k": sum(expected_best_of(r[:K], k) for r in rewards) / len(rewards)}
            for k in range(1, K + 1)]


def render_prompts(prompts: Sequence[list[dict]], tokenizer: Any, template: str) -> list[list[int]]:
    """Each prompt rendered with the chat template and the assistant's generation prompt (what the policy continues)."""
    from llamalab.tokenizer.templates import render

    return [render(p, template, tokenizer, add_generation_prompt=True)[0] for p in prompts]


def engine_context(prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, model_context: int) -> int:
    """The engine's context: the longest prompt plus the answer, at most the model's. The KV cache is allocated for
    it in every slot, so a 8k-context model sampling short answers does not reserve 8k positions per slot."""
    longest = max((len(p) for p in prompt_ids), default=0)
    return max(2, min(model_context, longest + max_new_tokens + 1))


def sample_answers(engine: Any, tokenizer: Any, template: str, prompt_ids: Sequence[list[int]], k: int,
                   max_new_tokens: int, temperature: float, top_p: float, seed: int,
                   ledger: PromptLedger | None = None, wheres: Sequence[str] | None = None, chunk: int = 8
                   ) -> list[list[dict[str, Any]] | None]:
    """K sampled answers per rendered prompt (``{"text", "finish_reason", "tokens"}``), stopping at the template's
    end of turn; None for a prompt that does not fit the engine's context (counted as ``prompt_too_long`` in
    ``ledger``). Sample j of prompt i uses seed ``seed + i*k + j``, so a sample does not depend on the batching."""
    from llamalab.inference.sampling import SamplingParams
    from llamalab.tokenizer.templates import stop_strings, stop_token_ids

    stops, stop_ids = stop_strings(template), stop_token_ids(template, tokenizer)
    out: list[list[dict[str, Any]] | None] = [None] * len(prompt_ids)
    bar = Progress(len(prompt_ids), "rejection sampling", unit="prompts", every=5.0)
    for c in range(0, len(prompt_ids), chunk):
        ids, params, owners = [], [], []
        for i in range(c, min(c + chunk, len(prompt_ids))):
            p_ids = prompt_ids[i]
            room = engine.max_seq_len - len(p_ids)
            if room < 2:
                if ledger is not None:
                    ledger.drop("prompt_too_long", wheres[i] if wheres else f"prompt {i}",
                                f"{len(p_ids)} prompt tokens leave no room in the context of {engine.max_seq_len}")
                    ledger.kept -= 1
                continue
            for j in range(k):
                ids.append(p_ids)
                params.append(SamplingParams(max_tokens=min(max_new_tokens, room - 1), temperature=temperature,
                                             top_p=top_p, seed=seed + i * k + j, stop=stops, stop_token_ids=stop_ids))
                owners.append(i)
        for i, o in zip(owners, engine.generate(ids, params) if ids else []):
            out[i] = (out[i] or []) + [{"text": o.text.strip(), "finish_reason": o.finish_reason,
                                        "tokens": len(o.token_ids)}]
        bar.update(min(chunk, len(prompt_ids) - c))
    bar.close()
    return out


def sharegpt_record(prompt: list[dict], answer: str, **extra: Any) -> dict[str, Any]:
    """A ShareGPT record (``llamalab sft --format sharegpt``) of ``prompt`` + the assistant ``answer``."""
    frm = {"system": "system", "user": "human", "assistant": "gpt"}
    turns = [{"from": frm[m["role"]], "value": m["content"]} for m in prompt]
    return {"conversations": turns + [{"from": "gpt", "value": answer}], **extra}


def select_best(prompts: Sequence[tuple[str, list[dict]]], samples: Sequence[list[dict[str, Any]] | None],
                rewards: Sequence[list[float]]) -> tuple[list[dict], list[dict], Counter]:
    """(samples.jsonl rows, kept ShareGPT records, drops): per prompt the argmax-reward answer (first on ties)."""
    rows, kept, dropped = [], [], Counter()
    it = iter(rewards)
    for (where, prompt), ss in zip(prompts, samples):
        if ss is None:
            continue
        rs = next(it)
        best = max(range(len(rs)), key=lambda j: (rs[j], -j))
        rows.append({"where": where, "prompt": prompt, "best": best,
                     "samples": [{**s, "reward": r} for s, r in zip(ss, rs)]})
        if not ss[best]["text"]:
            dropped["empty_best"] += 1
            continue
        kept.append(sharegpt_record(prompt, ss[best]["text"], reward=rs[best], where=where))
    return rows, kept, dropped


def write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)


def curve_figure(curve: list[dict[str, float]], path: Path) -> Path | None:
    """best-of-k vs k as a PNG (None without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(5.6, 3.2))
    ax.plot([c["k"] for c in curve], [c["best_of_k"] for c in curve], marker="o")
    ax.set_xlabel("K samples per prompt")
    ax.set_ylabel("reward of the best (expected)")
    ax.set_title("Rejection sampling: best-of-K reward")
    ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
