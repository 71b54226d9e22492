"""Reward models (Llama 2, Touvron et al. 2023b, section 3.2.2): a Transformer with a scalar head on the last token.

:class:`RewardModel` is a :class:`~llamalab.model.transformer.Transformer` (same parameter names, so a model
folder's weights load into it unchanged) whose language-model head is replaced by ``score``, an
``nn.Linear(dim, 1, bias=False)`` (Hugging Face's ``LlamaForSequenceClassification`` name) read at the last
real token of each row (:meth:`Transformer.hidden`). Llama 2 initialises its reward models from the chat
model's checkpoint; :func:`reward_model_from` does the same from any loaded model (the LM head is dropped: an
untied one is not stored in the reward model's folder; a tied one is the embedding, kept). The new head is drawn
from N(0, 1/(dim+1)) as in lm-human-preferences (Ziegler et al. 2019).

Training loss: the binary ranking loss with margin, ``-log sigmoid(r_chosen - r_rejected - m)`` (Llama 2, eq. 2),
summed over pairs (:func:`ranking_loss`, a Trainer ``loss_fn`` over
:class:`~llamalab.align.data.PairBatch`); it also reports the pair accuracy (``r_chosen > r_rejected``), the
mean margin ``r_chosen - r_rejected`` and the two mean rewards.

A reward model folder is a llamalab model folder (``model.safetensors`` without ``output.weight``, plus
``score.weight``; ``config.json`` with ``"kind": "reward"`` and the ``chat_template`` it was trained with; the
tokenizer files). :func:`load_reward_model` reads it (also a run folder, resolved to its ``model/``), and
``llamalab convert RM OUT`` exports it as ``LlamaForSequenceClassification`` (``num_labels`` 1).

Scoring API (used by ``llamalab rm score``, rejection sampling and PPO):

- :func:`score_tokens` ``(rm, tokens, last_index) -> (B,)`` rewards of right-padded rows;
- :func:`score_texts` ``(rm, tok, template, conversations, batch_size) -> list[float]``: each conversation
  (ending with the assistant answer to score) rendered with the chat template as in training, the first
  ``max_seq_len`` tokens kept (as :func:`~llamalab.align.data.encode_pairs` truncates).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llamalab.align.data import EncodedPair, PairBatch, collate_pairs, record_conversations
from llamalab.common import LlamalabError
from llamalab.finetune.packing import batch_indices, pad_id_of
from llamalab.model.config import ModelConfig
from llamalab.model.layers import WeightInit
from llamalab.model.transformer import Transformer
from llamalab.train.optim import OptimConfig

KIND = "reward"  # config.json "kind" of a reward model folder


class RewardModel(Transformer):
    """A Transformer whose output head is a scalar ``score`` read at the last real token (module docstring)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        del self.output  # the LM head: unused (a tied one is the embedding, which stays)
        self.score = nn.Linear(cfg.dim, 1, bias=False)
        if not self.score.weight.is_meta:
            self.init_score()

    @torch.no_grad()
    def init_weights(self, seed: int | None = None, init: WeightInit | None = None) -> None:
        """As :meth:`Transformer.init_weights` without the LM head, plus the score head."""
        if init is None:
            init = WeightInit.for_model(self.cfg.init, self.cfg.n_layers, seed)
        self.freqs_cis.copy_(self._freqs().to(self.freqs_cis.device))
        init.normal_(self.tok_embeddings.weight, init.std)
        for layer in self.layers:
            layer.init_weights(init)
        self.norm.init_weights(init)
        if hasattr(self, "score"):
            init.normal_(self.score.weight, 1 / math.sqrt(self.cfg.dim + 1))

    @torch.no_grad()
    def init_score(self, generator: torch.Generator | None = None) -> None:
        self.score.weight.normal_(0.0, 1 / math.sqrt(self.cfg.dim + 1), generator=generator)

    def forward(self, tokens: torch.Tensor, last_index: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T) -> rewards (B,) in fp32 at ``last_index`` (B,), or per position (B, T) without it.

        Rows are right-padded: causal attention never lets the last real token see the padding after it.
        """
        h = self.hidden(tokens, mask=mask)
        if last_index is not None:
            h = h[torch.arange(h.shape[0], device=h.device), last_index]
        # a fresh tensor, not a view: FSDP2 hooks backward on a root's outputs and warns about views
        return self.score(h).squeeze(-1).to(torch.float32, copy=True)


def reward_model_from(model: Transformer) -> RewardModel:
    """A reward model initialised from ``model``'s weights (its LM head dropped) and a fresh score head.

    The head is drawn from the global torch RNG (seed it first)."""
    with torch.device("meta"):
        rm = RewardModel(model.cfg)
    p = next(model.parameters())
    rm.to_empty(device=p.device)
    rm.freqs_cis.copy_(rm._freqs().to(p.device))
    sd = {k: v for k, v in model.state_dict().items() if k != "output.weight"}
    missing, unexpected = rm.load_state_dict(sd, strict=False)
    if unexpected or set(missing) != {"score.weight"}:
        raise LlamalabError(f"reward model: the base's weights do not fit (missing {missing[:4]}, "
                            f"unexpected {unexpected[:4]})")
    rm.init_score()
    return rm.to(p.dtype)


def gather_reward_model(rm: nn.Module, lora: Any = None) -> RewardModel | None:
    """An FSDP-sharded reward model's full weights as a plain CPU :class:`RewardModel` on rank 0 (None elsewhere),
    LoRA adapters kept unmerged (``lora``: its config, rank 0 for none). NOTE: a collective: every rank calls it."""
    from llamalab.common import is_rank0
    from llamalab.finetune.lora import apply_lora
    from llamalab.train.checkpoint import full_model_state

    full = full_model_state(rm)
    if not is_rank0():
        return None
    with torch.device("meta"):
        plain = RewardModel(rm.cfg)
    plain.to_empty(device="cpu")
    plain.freqs_cis.copy_(plain._freqs())
    if lora is not None and lora.rank:
        apply_lora(plain, lora)
    missing, unexpected = plain.load_state_dict(full, strict=False)
    if unexpected or missing:
        raise LlamalabError(f"rm: gathered weights do not fit the reward model (missing {missing[:4]}, "
                            f"unexpected {unexpected[:4]})")
    return plain


def score_tokens(rm: nn.Module, tokens: torch.Tensor, last_index: torch.Tensor) -> torch.Tensor:
    """(B,) fp32 rewards of right-padded ``tokens`` (B, T) read at ``last_index`` (B,). ``rm`` may be wrapped
    (DDP, FSDP): it is called, not reached into."""
    return rm(tokens, last_index=last_index)


# ----------------------------------------------------------------------------- the loss


def ranking_losses(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """Per-pair ``-log sigmoid(r_chosen - r_rejected - margin)`` (Llama 2, eq. 2; margin 0: InstructGPT's)."""
    d = r_chosen - r_rejected
    if margin is not None:
        d = d - margin
    return -F.logsigmoid(d)


def ranking_loss(rm: nn.Module, batch: PairBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Trainer ``loss_fn``: summed ranking loss of a :class:`PairBatch` and summed statistics (accuracy: chosen
    scored above rejected; margin: mean of r_chosen - r_rejected; reward_chosen, reward_rejected)."""
    r = score_tokens(rm, batch.tokens, batch.last_index)
    n = batch.tokens.shape[0] // 2
    rc, rr = r[:n], r[n:]
    if batch.units() == 0:  # a rank's empty share of the last batch: backward runs, nothing counts
        zero = r.sum() * 0.0
        return zero, {k: zero.detach() for k in ("accuracy", "margin", "reward_chosen", "reward_rejected")}
    d = (rc - rr).detach()
    loss = ranking_losses(rc, rr, batch.margin.to(r.dtype)).sum()
    return loss, {"accuracy": (d > 0).float().sum(), "margin": d.sum(),
                  "reward_chosen": rc.detach().sum(), "reward_rejected": rr.detach().sum()}


def pair_batch_fn(pairs: Sequence[EncodedPair], g: int, per_epoch: int, micro: int, pad_id: int, seed: int,
                  rank: int = 0, world: int = 1) -> Callable[[int], list[PairBatch]]:
    """``batch(b)``: this rank's micro-batches of global batch ``b`` (``g`` pairs of epoch ``b // per_epoch`` in
    that epoch's seeded shuffle): a pure function of ``b`` whatever the world size, so resume replays exactly.
    A rank left without pairs (a short last batch) gets one pair counted as zero units."""

    def batch(b: int) -> list[PairBatch]:
        picked, mine = ([pairs[i] for i in ix] for ix in batch_indices(len(pairs), g, per_epoch, seed, b, rank, world))
        if not mine:
            empty = collate_pairs(picked[:1], pad_id)
            empty.margin = empty.margin[:0]
            return [empty]
        return [collate_pairs(mine[k:k + micro], pad_id) for k in range(0, len(mine), micro)]

    return batch


def eval_pair_batches(pairs: Sequence[EncodedPair], micro: int, pad_id: int):
    """Every pair once, in order, ``micro`` pairs at a time (held-out accuracy)."""
    for k in range(0, len(pairs), micro):
        yield collate_pairs(pairs[k:k + micro], pad_id)


# ----------------------------------------------------------------------------- folders


def save_reward_model(folder: str | Path, rm: RewardModel, tokenizer: Any, template: str,
                      extra: dict[str, Any] | None = None) -> Path:
    """Write a reward model folder (module docstring): weights, config with ``kind: reward``, tokenizer files."""
    from llamalab.model.folder import save_model

    return save_model(folder, rm, extra={"kind": KIND, "chat_template": template, **(extra or {})},
                      tokenizer=tokenizer)


def load_reward_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                      verify: bool = True) -> tuple[RewardModel, Any, dict[str, Any]]:
    """A reward model folder (or a run folder holding one in ``model/``) -> (rm in eval mode, tokenizer, meta).
    ``device`` may be ``"auto"`` (CUDA when available)."""
    from llamalab.common import resolve_device
    from llamalab.model.folder import (
        check_memory,
        load_into,
        load_state,
        load_tokenizer,
        read_model_config,
        resolve_model_path,
        verify_checksums,
    )

    folder = resolve_model_path(path)
    if folder.is_file():
        raise LlamalabError(f"{folder}: a reward model is a folder written by `llamalab rm`, not a file")
    cfg, meta = read_model_config(folder)
    if meta.get("kind") != KIND:
        raise LlamalabError(f"{folder / 'config.json'}: not a reward model (no \"kind\": \"{KIND}\"); train one "
                            f"with `llamalab rm --base MODEL --data PAIRS`")
    if verify:
        verify_checksums(folder)
    weights = folder / "model.safetensors"
    check_memory(cfg, weights.stat().st_size if weights.exists() else 0, str(folder))
    sd = load_state(weights)
    with torch.device("meta"):
        rm = RewardModel(cfg)
    rm.to_empty(device="cpu")
    rm.init_weights()
    load_into(rm, sd, str(weights))
    rm.to(device=resolve_device(device) if isinstance(device, str) else device, dtype=dtype).eval()
    return rm, load_tokenizer(folder), meta


# ----------------------------------------------------------------------------- scoring text


def encode_conversation(conversation: Sequence[dict], tokenizer: Any, template: str, max_len: int) -> list[int]:
    """The ids a reward model scores: the conversation (ending with the assistant answer) rendered as in
    training, its first ``max_len`` tokens."""
    from llamalab.tokenizer.templates import render

    if not conversation or conversation[-1].get("role") != "assistant":
        raise LlamalabError("score: a conversation to score must end with the assistant's answer")
    ids, _ = render(list(conversation), template, tokenizer, add_generation_prompt=False)
    return ids[:max_len]


@torch.no_grad()
def score_ids(rm: RewardModel, rows: Sequence[Sequence[int]], batch_size: int = 8, pad_id: int = 0) -> list[float]:
    """Rewards of token rows, ``batch_size`` at a time (longest first, so padding is small); input order kept."""
    if batch_size < 1:
        raise LlamalabError(f"batch_size must be >= 1, got {batch_size}")
    was = rm.training
    rm.eval()
    dev = next(rm.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    out = [0.0] * len(rows)
    for k in range(0, len(order), batch_size):
        idx = order[k:k + batch_size]
        T = max(len(rows[i]) for i in idx)
        tokens = torch.full((len(idx), T), pad_id, dtype=torch.long)
        for j, i in enumerate(idx):
            tokens[j, :len(rows[i])] = torch.tensor(list(rows[i]), dtype=torch.long)
        last = torch.tensor([len(rows[i]) - 1 for i in idx], dtype=torch.long)
        r = score_tokens(rm, tokens.to(dev), last.to(dev)).tolist()
        for j, i in enumerate(idx):
            out[i] = float(r[j])
    rm.train(was)
    return out


def score_texts(rm: RewardModel, tokenizer: Any, template: str, conversations: Sequence[Sequence[dict]],
                batch_size: int = 8) -> list[float]:
    """The reward of each conversation (a role/content list ending with the assistant answer to score)."""
    rows = [encode_conversation(c, tokenizer, template, rm.cfg.max_seq_len) for c in conversations]
    for i, r in enumerate(rows):
        if not r:
            raise LlamalabError(f"score: conversation {i} renders to no tokens")
    return score_ids(rm, rows, batch_size, pad_id_of(tokenizer))


# ----------------------------------------------------------------------------- the training run (llamalab rm)

FULL_LR, LORA_LR = 1e-5, 2e-4


@dataclass
class RMOptimConfig(OptimConfig):
    """Llama 2's reward-model optimizer (section 3.2.2): AdamW, peak lr 1e-5 (5e-6 for the 70B model), cosine down
    to 10% of the peak, warmup 3% of the steps, weight decay 0.1. With LoRA the default peak is 2e-4, as for SFT's
    LoRA (adapters start at zero; no paper gives a reward-model LoRA rate)."""

    lr: float | None = field(default=None, metadata={
        "help": f"peak learning rate (unset: {FULL_LR:g}, Llama 2's for all but 70B (5e-6); {LORA_LR:g} with LoRA)"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "cosine floor as a fraction of the peak"})
    warmup_steps: int = field(default=0, metadata={
        "help": "linear warmup steps, at most a tenth of the run (needs --optim.warmup-ratio 0)"})
    warmup_ratio: float = field(default=0.03, metadata={"help": "warmup as a fraction of the steps"})

    def peak_lr(self, lora: bool) -> float:
        return self.lr or (LORA_LR if lora else FULL_LR)


def heldout_stats(rm: nn.Module, pairs: Sequence[EncodedPair], micro: int, pad_id: int,
                  autocast: Callable = contextlib.nullcontext) -> dict[str, float] | None:
    """Held-out ranking loss, accuracy (r_chosen > r_rejected), mean margin and rewards; None without pairs."""
    from llamalab.train.step import evaluate_loss

    out = evaluate_loss(rm, eval_pair_batches(pairs, micro, pad_id), autocast, ranking_loss, with_stats=True)
    return {**out, "pairs": len(pairs)} if out else None


class HeldoutEval:
    """The Trainer's ``eval_fn`` over held-out pairs (:func:`heldout_stats`); remembers its last result, so the end
    of the run does not score the held-out pairs a second time."""

    def __init__(self, pairs: Sequence[EncodedPair], micro: int, pad_id: int) -> None:
        self.pairs, self.micro, self.pad_id = pairs, micro, pad_id
        self.last: dict[str, float] | None = None

    def __call__(self, model: nn.Module, autocast: Callable = contextlib.nullcontext) -> dict[str, float] | None:
        self.last = heldout_stats(model, self.pairs, self.micro, self.pad_id, autocast)
        return {k: v for k, v in self.last.items() if k != "pairs"} if self.last else None  # metrics, not counts


def finish_rm(run: Any, rm: RewardModel, *, lora: Any, base: Path, data: Sequence[str], fmt: str, tokenizer: Any,
              template: str, ledger: Any, split: dict[str, int], heldout: dict[str, Any], result: dict[str, Any],
              seconds: float) -> dict[str, Any]:
    """After training (rank 0): ``adapter/`` with LoRA, ``model/`` (the reward model folder, LoRA merged),
    ``rm_summary.json`` and ``report.html``; prints the end line."""
    from llamalab.common import print0, write_json_atomic
    from llamalab.config import to_dict
    from llamalab.finetune.lora import merge_lora, save_adapter
    from llamalab.finetune.outputs import base_record
    from llamalab.report.html import write_report

    summary = {**result, "data": ledger.to_json(), "split": split, "heldout": heldout, "template": template}
    if result["steps"] < result["planned_steps"]:
        print0(f"rm: stopped at step {result['steps']}/{result['planned_steps']}; continue with --resume "
               f"(no model/ written yet)")
        return summary
    base_info = base_record(base)
    if lora.rank:
        summary["adapter"] = str(save_adapter(run.adapter, rm, lora, base_info))
        merge_lora(rm)
    after = heldout.get("after") or {}
    extra = {"reward": {"base": base_info, "data": [str(p) for p in data], "format": fmt,
                        "lora": to_dict(lora) if lora.rank else None, "steps": result["steps"],
                        "heldout_accuracy": after.get("accuracy"), "heldout_pairs": after.get("pairs")}}
    summary["model"] = str(save_reward_model(run.model, rm.cpu().float(), tokenizer, template, extra))
    write_json_atomic(run.rm_summary, summary)
    summary["report"] = str(write_report(run.root))
    before = heldout.get("before") or {}
    acc = (f"held-out accuracy {before.get('accuracy', float('nan')):.1%} -> {after['accuracy']:.1%} on "
           f"{after['pairs']} pairs (chance 50%), mean margin {after['margin']:.3f}") if after else "no held-out pairs"
    print0(f"rm: done | {ledger.read} records, {split['train']} train / {split['heldout']} held-out pairs | {acc} | "
           f"{result['steps']} steps in {seconds:.1f}s | model {summary['model']} | report {summary['report']}")
    return summary


# ----------------------------------------------------------------------------- scoring files (llamalab rm score)

def score_records(rm: RewardModel, tokenizer: Any, template: str, paths: Sequence[str | Path], fmt: str = "auto",
                  batch_size: int = 8, on_error: str = "raise", limit: int = 0
                  ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Score every record of ``paths`` (:func:`llamalab.align.data.record_conversations`) -> (one output row per
    record, summary).

    A pair row: ``reward_chosen``, ``reward_rejected``, ``chosen_wins`` (r_chosen > r_rejected); an answer row:
    ``reward``. Each row carries ``where`` (file:line) and the record's ``id`` when it has one. The summary counts
    records, pairs, answers and skipped ones (by reason), the pair accuracy and the mean rewards."""
    from collections import Counter

    from llamalab.finetune.data import BadRecord, iter_records

    kinds: list[tuple[str, str, Any]] = []
    convs: list[list[dict]] = []
    skipped: Counter = Counter()
    read = 0
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        for where, rec in iter_records(path):
            if limit and read >= limit:
                break
            read += 1
            try:
                if isinstance(rec, json.JSONDecodeError):
                    raise BadRecord("malformed", f"invalid JSON ({rec.msg}, column {rec.colno})")
                kind, cs = record_conversations(rec, fmt)
            except BadRecord as e:
                if on_error == "raise":
                    raise LlamalabError(f"{where}: {e} (--on-error skip counts and skips such records)") from None
                skipped[e.reason] += 1
                continue
            kinds.append((kind, where, rec.get("id")))
            convs.extend(cs)
    rewards = score_texts(rm, tokenizer, template, convs, batch_size) if convs else []
    rows, k = [], 0
    for kind, where, rid in kinds:
        row: dict[str, Any] = {"where": where, **({"id": rid} if rid is not None else {})}
        if kind == "pair":
            rc, rr = rewards[k], rewards[k + 1]
            row.update(reward_chosen=rc, reward_rejected=rr, chosen_wins=rc > rr)
            k += 2
        else:
            row["reward"] = rewards[k]
            k += 1
        rows.append(row)
    pairs = [r for r in rows if "chosen_wins" in r]
    answers = [r["reward"] for r in rows if "reward" in r]
    summary = {"records": read, "scored": len(rows), "pairs": len(pairs), "answers": len(answers),
               "skipped": dict(skipped),
               "pair_accuracy": sum(r["chosen_wins"] for r in pairs) / len(pairs) if pairs else None,
               "mean_margin": sum(r["reward_chosen"] - r["reward_rejected"] for r in pairs) / len(pairs)
               if pairs else None,
               "mean_reward": sum(answers) / len(answers) if answers else None}
    return rows, summary
