"""PPO, Llama 2's RLHF step (Touvron et al. 2023b, section 3.2.3; Ouyang et al. 2022; Ziegler et al. 2019).

One *iteration*: sample an answer to each of ``rollout_batch`` prompts from the policy, score every answer with the
reward model(s), then take ``epochs x rollout_batch / minibatch`` clipped-surrogate updates on that buffer. Every
update is one step of the one :class:`~llamalab.train.trainer.Trainer`: its ``batch(b)`` callback
(:class:`PPOBatches`) builds the rollout buffer when ``b`` starts an iteration and returns the minibatch's
micro-batches (:class:`PPOBatch`, a ``UnitBatch`` whose units are answer tokens); :class:`PPOLoss` is the
``loss_fn``; so metrics.jsonl, the guards, checkpoints and ``--resume`` are the trainer's.

Per answer token ``t`` (Llama 2, eq. 1-3)::

    r_t = -beta * (log pi(a_t|s_t) - log pi_ref(a_t|s_t))  (+ whiten(R(prompt, answer)) at the last answer token)

``R`` is the reward model's score (several RMs: a weighted sum, or Llama 2's safety gate), whitened with running
statistics over every rollout so far (kept as buffers of :class:`PPOModel`, so they are checkpointed). Advantages
are GAE (gamma 1, lambda 0.95), whitened per rollout batch; the policy loss is PPO's clipped surrogate (0.2), the
value loss the clipped squared error (0.2), weighted ``vf_coef``. With ``kl_target`` the KL coefficient adapts
(Ziegler et al.'s proportional controller) so the per-answer KL tracks the target.

The value function is a scalar head on :meth:`Transformer.hidden` of a *copy of the policy* (under LoRA the copy
gets its own adapters; its trunk is frozen like the policy's). Trade-off: it doubles the trainable weights and
costs one more forward per update, but (a) the value's tokens are the policy's own, whatever tokenizer the reward
model uses, (b) the value loss never disturbs the policy's representation (a head shared with the policy trunk
would), (c) it starts from a model that reads the prompts like the policy. InstructGPT initialises it from the
reward model instead, which knows the reward but needs the same tokenizer.

The reference: under full fine-tuning a frozen copy of the starting policy (or ``--reference``); under LoRA the
policy itself with its adapters switched off (no second copy).

Rollouts are sampled with :func:`sample_answers`, a batched KV-cache loop over :class:`Transformer` that uses the
engine's own per-row sampling (:func:`llamalab.inference.sampling.choose`, one seeded generator per prompt), not
:class:`llamalab.inference.Engine`: the engine does not say which stop token ended a turn (EOS, ``<|eot_id|>``...),
and that token is the policy's last action, which PPO must train; and the engine's runner holds its own fused
copy of the weights, to be rebuilt (with LoRA merged) at every iteration.

Under torchrun: ``ddp`` replicates policy + value; ``fsdp`` (:func:`shard_ppo_model`) shards the policy and the
value model with FSDP2, each its own root (the blocks are units; a root holds the embedding, final norm and its
head), while the frozen reference and the reward model(s) stay whole on every rank (they take no gradients and no
optimizer state). Each rank samples its own prompts; :func:`sample_answers` gathers the policy's full weights
once per rollout micro-batch (:func:`full_weights`) and keeps them through its prefill and decode steps, so the
ranks' decode loops need not run in lockstep (a rank whose answers all stopped early makes no collective call).

Determinism: the prompts of iteration ``i`` and each prompt's sampling seed are functions of (seed, i), and the
trainer checkpoints only at iteration boundaries (``checkpoint_interval`` and ``stop_after`` count iterations), so
a resumed run equals a straight one bit for bit. A run cut inside an iteration (``--max-seconds``, a signal)
resumes by sampling that iteration's rollouts again from the partly updated policy (printed when it happens).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from llamalab.common import LlamalabError, print0
from llamalab.finetune.lora import LoRAConfig, LoRALinear
from llamalab.inference.sampling import SamplingParams, choose, make_generator
from llamalab.model.attention import KVCache
from llamalab.model.transformer import Transformer
from llamalab.train.optim import OptimConfig
from llamalab.train.stability import GuardConfig

PPO_LR, PPO_LORA_LR = 1e-6, 1e-5  # Llama 2: constant 1e-6; adapters start at zero and need a larger step
COMBINE = ("sum", "llama2")


# ----------------------------------------------------------------------------- configuration


@dataclass
class PPOOptimConfig(OptimConfig):
    """Llama 2's PPO optimizer: AdamW (0.9, 0.95), eps 1e-5, weight decay 0.1, clip 1.0, constant lr 1e-6."""
    lr: float | None = field(default=None, metadata={
        "help": f"learning rate, constant (unset: {PPO_LR:g}, or {PPO_LORA_LR:g} with LoRA)"})
    min_lr_ratio: float = field(default=1.0, metadata={"help": "1: a constant learning rate (Llama 2)"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warmup steps (Llama 2: none)"})
    warmup_ratio: float = field(default=0.0, metadata={"help": "warmup as a fraction of the steps"})
    eps: float = 1e-5

    def peak_lr(self, lora: bool) -> float:
        return self.lr or (PPO_LORA_LR if lora else PPO_LR)


@dataclass
class PPOLoRAConfig(LoRAConfig):
    dropout: float = field(default=0.0, metadata={
        "help": "dropout on the adapter's input (0: the update's log-probs then match the rollout's)"})


@dataclass
class PPOConfig:
    rollout_batch: int = field(default=512, metadata={"help": "prompts sampled per iteration (Llama 2: 512)"})
    minibatch: int = field(default=64, metadata={"help": "answers per update (Llama 2: 64)"})
    epochs: int = field(default=1, metadata={"help": "passes over each rollout buffer (Llama 2: 1)"})
    max_new_tokens: int = field(default=128, metadata={"help": "longest answer sampled"})
    max_prompt_len: int = field(default=0, metadata={"help": "longer prompts are dropped (0: min(the context, "
                                                              "1024) - max_new_tokens; at most the context - "
                                                              "max_new_tokens)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature of the rollouts"})
    top_p: float = 1.0
    top_k: int = 0
    kl_coef: float = field(default=0.01, metadata={"help": "beta of the per-token KL penalty (Llama 2: 0.01 for "
                                                           "7B/13B, 0.005 for 34B/70B)"})
    kl_target: float = field(default=0.0, metadata={"help": "adaptive KL: steer beta so the per-answer KL tracks "
                                                             "this (0: fixed beta)"})
    kl_horizon: float = field(default=10000.0, metadata={"help": "adaptive KL horizon, in answers"})
    gamma: float = 1.0
    lam: float = field(default=0.95, metadata={"help": "GAE lambda"})
    clip: float = field(default=0.2, metadata={"help": "PPO ratio clip"})
    clip_value: float = field(default=0.2, metadata={"help": "value clip around the rollout's values"})
    vf_coef: float = field(default=0.1, metadata={"help": "weight of the value loss"})
    whiten_advantages: bool = True
    score_clip: float = field(default=0.0, metadata={"help": "clip the whitened score to +-this (0: off)"})
    rollout_micro: int = field(default=16, metadata={"help": "answers sampled / scored per forward pass"})

    def validate(self, world: int = 1) -> None:
        for name in ("rollout_batch", "minibatch", "epochs", "max_new_tokens", "rollout_micro"):
            if getattr(self, name) <= 0:
                raise LlamalabError(f"ppo.{name} must be > 0, got {getattr(self, name)}")
        if self.rollout_batch % self.minibatch:
            raise LlamalabError(f"ppo.rollout_batch {self.rollout_batch} must be a multiple of ppo.minibatch "
                                f"{self.minibatch}")
        if self.minibatch % world or self.rollout_batch % world:
            raise LlamalabError(f"ppo.minibatch {self.minibatch} and ppo.rollout_batch {self.rollout_batch} must "
                                f"divide by the {world} data-parallel processes")
        checks = [("kl_coef", self.kl_coef >= 0), ("kl_target", self.kl_target >= 0),
                  ("kl_horizon", self.kl_horizon > 0),
                  ("gamma", 0 < self.gamma <= 1), ("lam", 0 <= self.lam <= 1), ("clip", self.clip > 0),
                  ("clip_value", self.clip_value > 0), ("vf_coef", self.vf_coef >= 0),
                  ("score_clip", self.score_clip >= 0), ("max_prompt_len", self.max_prompt_len >= 0)]
        for name, ok in checks:
            if not ok:
                raise LlamalabError(f"ppo.{name}: out of range ({getattr(self, name)})")
        self.sampling(1).validate()

    def updates_per_iteration(self) -> int:
        return self.epochs * (self.rollout_batch // self.minibatch)

    def sampling(self, max_tokens: int, seed: int | None = None) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k, seed=seed)


# ----------------------------------------------------------------------------- the model trained


class ValueModel(nn.Module):
    """A scalar head on the final hidden states of a trunk: values (B, T) in fp32."""

    def __init__(self, trunk: Transformer) -> None:
        super().__init__()
        del trunk.output  # the LM head is never read (a tied one is the embedding, which stays)
        self.trunk = trunk
        self.head = nn.Linear(trunk.cfg.dim, 1)
        nn.init.zeros_(self.head.weight)  # values start at 0: no arbitrary baseline on the first iteration
        nn.init.zeros_(self.head.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # a fresh tensor, not a view: FSDP2 hooks backward on a root's outputs and warns about views
        return self.head(self.trunk.hidden(tokens)).squeeze(-1).to(torch.float32, copy=True)


class PPOModel(nn.Module):
    """Policy + value model + the run's PPO state (running score statistics, the KL coefficient) as buffers, so
    that the trainer's checkpoints hold all of it. ``forward(tokens) -> (logits, values)``.

    NOTE: a checkpoint's ``model/`` therefore holds ``policy.*`` and ``value.*`` tensors: it resumes the run but
    is not a plain model folder; the run's ``model/`` (the policy alone, LoRA merged) is."""

    def __init__(self, policy: Transformer, value: ValueModel, kl_coef: float) -> None:
        super().__init__()
        self.policy = policy
        self.value = value
        self.register_buffer("score_stats", torch.zeros(3, dtype=torch.float64))  # count, mean, M2 (Welford)
        self.register_buffer("kl_coef", torch.tensor(float(kl_coef), dtype=torch.float64))

    @property
    def cfg(self):
        return self.policy.cfg

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.policy(tokens), self.value(tokens)

    def set_requires_gradient_sync(self, sync: bool) -> None:
        """FSDP (:func:`shard_ppo_model`): the step's flag to skip the gradient reduce-scatter of all but the last
        micro-batch, passed to both sharded roots; a no-op on a plain model."""
        for m in (self.policy, self.value):
            if hasattr(m, "set_requires_gradient_sync"):
                m.set_requires_gradient_sync(sync)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        sd = super().state_dict(*args, **kwargs)
        if self.cfg.tie_embeddings:  # NOTE: safetensors refuses aliased tensors; the embedding restores them
            prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
            sd.pop(f"{prefix}policy.output.weight", None)
        return sd


@contextlib.contextmanager
def adapters_off(model: nn.Module):
    """Run ``model`` as its base: every LoRA update scaled by 0 (exactly the base's output), restored after."""
    mods = [m for m in model.modules() if isinstance(m, LoRALinear)]
    scales = [m.scale for m in mods]
    for m in mods:
        m.scale = 0.0
    try:
        yield model
    finally:
        for m, s in zip(mods, scales):
            m.scale = s


# ----------------------------------------------------------------------------- rewards


Scorer = Callable[[list[list[dict]], list[str], list[list[int]]], torch.Tensor]  # prompts, answers, token ids


def load_reward_fn(spec: str) -> Scorer:
    """``module.path:function`` -> a scorer. The function takes (prompts, answers) (conversations as role/content
    lists, answer strings) and returns one float per answer: a scripted or rule-based reward."""
    mod_name, _, fn_name = spec.partition(":")
    if not mod_name or not fn_name:
        raise LlamalabError(f"--reward-fn: give module.path:function, got {spec!r}")
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise LlamalabError(f"--reward-fn {spec}: cannot import it ({e})") from None

    def score(prompts: list[list[dict]], answers: list[str], ids: list[list[int]]) -> torch.Tensor:
        out = torch.as_tensor(list(fn(prompts, answers)), dtype=torch.float64)
        if out.shape != (len(answers),):
            raise LlamalabError(f"--reward-fn {spec}: returned {tuple(out.shape)} values for {len(answers)} answers")
        return out
    return score


def reward_model_scorer(path: str, device: torch.device, batch_size: int) -> tuple[Scorer, dict]:
    """A reward model folder (``llamalab rm``) as a scorer: each (prompt, answer) rendered with the RM's own chat
    template and tokenizer (:func:`llamalab.align.reward.score_texts`), so a policy and a reward model need not share
    a tokenizer. Returns (scorer, record with path and weights sha256)."""
    from llamalab.align.reward import load_reward_model, score_texts
    from llamalab.tokenizer.templates import resolve_template

    rm, tok, meta = load_reward_model(path, device=device)
    for p in rm.parameters():
        p.requires_grad_(False)
    template = resolve_template(meta)

    def score(prompts: list[list[dict]], answers: list[str], ids: list[list[int]]) -> torch.Tensor:
        convs = [list(p) + [{"role": "assistant", "content": a}] for p, a in zip(prompts, answers)]
        return torch.tensor(score_texts(rm, tok, template, convs, batch_size), dtype=torch.float64)
    return score, {**_weights_record(model_path(path)), "template": template}


def model_path(path: str | Path) -> Path:
    from llamalab.model.folder import resolve_model_path

    return Path(resolve_model_path(path))


def _weights_record(path: str | Path) -> dict[str, Any]:
    from llamalab.finetune.outputs import base_record

    return base_record(Path(path))


def combine_scores(scores: list[torch.Tensor], how: str, weights: Sequence[float], threshold: float) -> torch.Tensor:
    """One score per answer from several reward models: a weighted sum, or Llama 2's rule (eq. 2):
    the safety RM's score (the first) where ``sigmoid(R_safety) < threshold``, else the helpfulness RM's (second)."""
    if len(scores) == 1:
        return scores[0] * (weights[0] if weights else 1.0)
    if how == "llama2":
        if len(scores) != 2:
            raise LlamalabError(f"--reward-combine llama2 needs two reward models (safety, helpfulness), "
                                f"got {len(scores)}")
        safety, helpful = scores
        return torch.where(torch.sigmoid(safety) < threshold, safety, helpful)
    w = list(weights) or [1.0] * len(scores)
    return sum(wi * s for wi, s in zip(w, scores))


# ----------------------------------------------------------------------------- sampling


def _fsdp_units(model: nn.Module) -> list[nn.Module]:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # no FSDP2 in this torch: nothing can be sharded
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def full_weights(policy: nn.Module):
    """Within: an FSDP2-sharded ``policy`` (:func:`shard_ppo_model`) holds its full weights on every rank, gathered
    once on entry (a collective) and kept through every forward (blocks do not reshard after each call), so that
    calls bypassing the root's ``forward`` (``hidden``, ``output``) work and make no collective calls; resharded on
    exit (blocks again reshard after forward, the root never does, as :func:`~llamalab.train.fsdp.apply_fsdp`). A
    plain model: nothing to do."""
    units = _fsdp_units(policy)
    for m in units:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield policy
    finally:
        for m in units:
            m.reshard()
            m.set_reshard_after_forward(m is not policy, recurse=False)


@torch.no_grad()
def sample_answers(policy: Transformer, prompts: list[list[int]], params: list[SamplingParams],
                   stop_ids: set[int], pad_id: int, batch_size: int) -> list[tuple[list[int], str]]:
    """Sample an answer to each prompt: (answer ids, "stop" | "length"); a stopped answer ends with its stop token.

    Batched ``batch_size`` prompts at a time: left-padded, one prefill and one decode pass per token over a
    KV cache (a boolean mask hides the padding), each row drawn with its own seeded generator as the engine does,
    so an answer does not depend on the batch it was drawn in (up to float rounding)."""
    device = next(policy.parameters()).device
    out: list[tuple[list[int], str]] = []
    for s in range(0, len(prompts), batch_size):
        with full_weights(policy):  # FSDP: the whole policy on every rank while this micro-batch decodes
            out.extend(_sample_batch(policy, prompts[s:s + batch_size], params[s:s + batch_size], stop_ids, pad_id,
                                     device))
    return out


def _sample_batch(policy: Transformer, rows: list[list[int]], ps: list[SamplingParams], stop_ids: set[int],
                  pad_id: int, device: torch.device) -> list[tuple[list[int], str]]:
    """One left-padded batch of :func:`sample_answers`: a prefill, then one decode pass per token."""
    cfg = policy.cfg
    B, P = len(rows), max(len(r) for r in rows)
    new = max(p.max_tokens for p in ps)
    if P + new > cfg.max_seq_len:
        raise LlamalabError(f"ppo: a prompt of {P} tokens plus {new} new ones exceeds the context "
                            f"({cfg.max_seq_len})")
    tokens = torch.full((B, P), pad_id, dtype=torch.long, device=device)
    real = torch.zeros(B, P + new, dtype=torch.bool, device=device)
    for i, r in enumerate(rows):
        tokens[i, P - len(r):] = torch.tensor(r, dtype=torch.long, device=device)
        real[i, P - len(r):] = True
    gens = [make_generator(p.seed, device) for p in ps]
    cache = KVCache(cfg, B, P + new, dtype=next(policy.parameters()).dtype, device=device)
    pos = torch.arange(P, device=device)
    causal = pos[None, :] <= pos[:, None]
    mask = (causal[None] & (real[:, None, :P] | torch.eye(P, dtype=torch.bool, device=device)[None]))[:, None]
    logits = policy.output(policy.hidden(tokens, cache, 0, mask)[:, -1]).float()
    answers: list[list[int]] = [[] for _ in range(B)]
    done: list[str | None] = [None] * B
    for t in range(new):
        live = [i for i in range(B) if done[i] is None]
        picked = choose(logits[live], [ps[i] for i in live], [gens[i] for i in live], torch.empty(0),
                        torch.empty(0))
        nxt = torch.full((B,), pad_id, dtype=torch.long, device=device)
        for i, tok in zip(live, picked):
            answers[i].append(tok)
            nxt[i] = tok
            if tok in stop_ids:
                done[i] = "stop"
            elif len(answers[i]) >= ps[i].max_tokens:
                done[i] = "length"
        if all(d is not None for d in done):
            break
        step_mask = real[:, None, None, :P + t + 1].clone()
        step_mask[:, :, :, P:] = True
        logits = policy.output(policy.hidden(nxt[:, None], cache, P + t, step_mask)[:, -1]).float()
    return [(a, d or "length") for a, d in zip(answers, done)]


# ----------------------------------------------------------------------------- advantages


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the masked (answer) positions of each row; (advantages, returns).

    rewards, values, mask (B, T); a row's masked positions are contiguous and the value after the last is 0
    (the answer ended). delta_t = r_t + gamma V_{t+1} - V_t; A_t = delta_t + gamma lambda A_{t+1}; R_t = A_t + V_t."""
    m = mask.to(values.dtype)
    adv = torch.zeros_like(values)
    last = torch.zeros_like(values[:, 0])
    T = values.shape[1]
    for t in reversed(range(T)):
        cont = m[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        next_v = values[:, t + 1] * cont if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = delta + gamma * lam * cont * last
        adv[:, t] = last * m[:, t]
    return adv, (adv + values) * m


def token_rewards(logp: torch.Tensor, ref_logp: torch.Tensor, score: torch.Tensor, mask: torch.Tensor,
                  kl_coef: float) -> torch.Tensor:
    """(B, T): -kl_coef * (logp - ref_logp) at every answer position, plus ``score`` at each row's last one."""
    m = mask.to(logp.dtype)
    r = -kl_coef * (logp - ref_logp) * m
    last = (m * torch.arange(m.shape[1], device=m.device)).argmax(1)
    r[torch.arange(r.shape[0]), last] += score.to(r.dtype)
    return r


def _all_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        t = t.clone()
        dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        moved = t.to(dev)
        dist.all_reduce(moved)
        t = moved.to(t.device)
    return t


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries of every rank; entries outside the mask become 0."""
    m = mask.to(torch.float64)
    xs = x.to(torch.float64)
    s = _all_sum(torch.stack([m.sum(), (xs * m).sum(), (xs * xs * m).sum()]))
    n = max(float(s[0]), 1.0)
    mean = float(s[1]) / n
    var = max(float(s[2]) / n - mean * mean, 0.0)
    return ((xs - mean) / math.sqrt(var + eps) * m).to(x.dtype)


def update_running(stats: torch.Tensor, x: torch.Tensor) -> None:
    """Chan et al.'s merge of a batch (every rank's) into running (count, mean, M2), in place."""
    xs = x.to(torch.float64)
    s = _all_sum(torch.stack([torch.tensor(float(xs.numel()), dtype=torch.float64), xs.sum().cpu(),
                              (xs * xs).sum().cpu()]))
    nb = float(s[0])
    if nb == 0:
        return
    mb = float(s[1]) / nb
    m2b = max(float(s[2]) - nb * mb * mb, 0.0)
    na, ma, m2a = (float(v) for v in stats.tolist())
    n = na + nb
    d = mb - ma
    stats.copy_(torch.tensor([n, ma + d * nb / n, m2a + m2b + d * d * na * nb / n], dtype=torch.float64))


def running_whiten(stats: torch.Tensor, x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    n, mean, m2 = (float(v) for v in stats.tolist())
    var = m2 / n if n > 1 else 1.0
    return (x.to(torch.float64) - mean) / math.sqrt(var + eps)


def adapt_kl(kl_coef: float, kl: float, target: float, n: int, horizon: float) -> float:
    """Ziegler et al.'s proportional controller: beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon."""
    err = min(max(kl / target - 1.0, -0.2), 0.2)
    return kl_coef * (1.0 + err * n / horizon)


# ----------------------------------------------------------------------------- the batches


@dataclass
class PPOBatch:
    """A PPO micro-batch (``UnitBatch``): units are answer tokens. Position t of ``mask``, ``old_logp``,
    ``old_values``, ``advantages``, ``returns`` describes the action tokens[:, t+1] taken in state tokens[:, :t+1]
    (aligned with logits[:, t]); the last column is never masked. ``consts`` are the iteration's rollout
    statistics (reward, KL ...), logged unchanged beside the update's own."""
    tokens: torch.Tensor  # (B, T) right-padded
    mask: torch.Tensor  # (B, T) bool
    old_logp: torch.Tensor  # (B, T)
    old_values: torch.Tensor  # (B, T)
    advantages: torch.Tensor  # (B, T)
    returns: torch.Tensor  # (B, T)
    consts: dict[str, float] = field(default_factory=dict)

    def to(self, device: Any) -> "PPOBatch":
        return PPOBatch(*(getattr(self, k).to(device) for k in ("tokens", "mask", "old_logp", "old_values",
                                                                  "advantages", "returns")), dict(self.consts))

    def units(self) -> int:
        return int(self.mask.sum())

    def n_tokens(self) -> int:
        """Tokens of the rows up to each row's last answer token (what the forward reads, padding aside)."""
        t = self.mask.shape[1]
        cols = torch.arange(t, device=self.mask.device)
        last = torch.where(self.mask, cols, -2).amax(1)  # mask[:, t] is the action tokens[:, t+1]; -2: no answer
        return int((last + 2).clamp(max=t).sum())


def _logp_of(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(B, T): log p(tokens[:, t+1] | logits[:, t]); the last column 0."""
    lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
    return F.pad(lp, (0, 1))


@dataclass
class PPOLoss:
    """The ``loss_fn``: clipped surrogate + vf_coef x clipped value loss, summed over answer tokens, with the
    update's statistics (summed: the step averages them over the global tokens)."""
    clip: float = 0.2
    clip_value: float = 0.2
    vf_coef: float = 0.1

    def __call__(self, model: nn.Module, b: PPOBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits, values = model(b.tokens)
        m = b.mask
        lsm = torch.log_softmax(logits[:, :-1].float(), -1)  # one (B, T-1, V) log-softmax for log-probs and entropy
        logp = F.pad(lsm.gather(-1, b.tokens[:, 1:, None]).squeeze(-1), (0, 1))[m]
        old, adv, ret, old_v, v = b.old_logp[m], b.advantages[m], b.returns[m], b.old_values[m], values[m]
        log_ratio = logp - old
        ratio = torch.exp(log_ratio)
        pg1 = -adv * ratio
        pg2 = -adv * torch.clamp(ratio, 1.0 - self.clip, 1.0 + self.clip)
        pg = torch.maximum(pg1, pg2)
        v_clipped = old_v + torch.clamp(v - old_v, -self.clip_value, self.clip_value)
        vf = 0.5 * torch.maximum((v - ret) ** 2, (v_clipped - ret) ** 2)
        loss = pg.sum() + self.vf_coef * vf.sum()
        with torch.no_grad():
            lg = lsm[m[:, :-1]]
            n = float(m.sum())
            stats = {"policy_loss": pg.sum(), "value_loss": vf.sum(), "entropy": -(lg.exp() * lg).sum(),
                     "clip_frac": (pg2 > pg1).float().sum(), "approx_kl": ((ratio - 1) - log_ratio).sum(),
                     "value_clip_frac": ((v - old_v).abs() > self.clip_value).float().sum(),
                     **{k: torch.tensor(c * n) for k, c in b.consts.items()}}
        return loss, stats


def _pad_rows(rows: list[list[int]], pad: int, width: int) -> torch.Tensor:
    out = torch.full((len(rows), width), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def _seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "big") >> 2


@dataclass
class Rollouts:
    """One iteration's buffer on this rank (tensors on the CPU) and its samples."""
    iteration: int
    tokens: torch.Tensor
    mask: torch.Tensor
    old_logp: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    lengths: list[int]
    consts: dict[str, float]
    samples: list[dict[str, Any]]


class PPOBatches:
    """The trainer's ``batch(b)``: global batch ``b`` is update ``b % U`` of iteration ``b // U`` (U updates per
    iteration: ``epochs`` passes of ``rollout_batch / minibatch`` minibatches in a seeded order); its first update
    samples and scores the rollouts (:meth:`rollout`). Returns this rank's micro-batches of the minibatch."""

    def __init__(self, model: PPOModel, reference: Transformer | None, scorer: Scorer, prompts: list[list[dict]],
                 prompt_ids: list[list[int]], tokenizer: Any, stop_ids: set[int], cfg: PPOConfig, micro: int,
                 seed: int, rank: int, world: int, device: torch.device, autocast: Callable = contextlib.nullcontext,
                 on_rollout: Callable[[Rollouts], None] | None = None) -> None:
        self.model, self.reference, self.scorer = model, reference, scorer
        self.prompts, self.prompt_ids, self.tok = prompts, prompt_ids, tokenizer
        self.stop_ids, self.cfg, self.micro, self.seed = stop_ids, cfg, micro, seed
        self.rank, self.world, self.device, self.autocast = rank, world, device, autocast
        self.pad_id = next(i for i in (tokenizer.pad_id, tokenizer.eos_id, 0) if i >= 0)
        self.updates = cfg.updates_per_iteration()
        self.buffer: Rollouts | None = None
        self.on_rollout = on_rollout

    # the prompts of iteration i: a seeded permutation of the prompt set per pass over it
    def prompt_indices(self, it: int) -> list[int]:
        n, r = len(self.prompts), self.cfg.rollout_batch
        out: list[int] = []
        pos = it * r
        while len(out) < r:
            epoch, off = divmod(pos, n)
            g = torch.Generator().manual_seed(_seed(self.seed, "prompts", epoch))
            perm = torch.randperm(n, generator=g).tolist()
            take = perm[off:off + r - len(out)]
            out += take
            pos += len(take)
        return out

    def __call__(self, b: int) -> list[PPOBatch]:
        it, u = divmod(b, self.updates)
        if self.buffer is None or self.buffer.iteration != it or u == 0:
            if u != 0:
                print0(f"ppo: resuming inside iteration {it} (update {u}/{self.updates}): its rollouts are sampled "
                       f"again from the current policy, so this run departs from a straight one")
            self.buffer = self.rollout(it)
        buf = self.buffer
        mb = self.cfg.minibatch
        epoch, j = divmod(u, self.cfg.rollout_batch // mb)
        g = torch.Generator().manual_seed(_seed(self.seed, it, epoch, 7))
        rows = torch.randperm(buf.tokens.shape[0], generator=g)[j * mb:(j + 1) * mb]  # the global minibatch
        per = mb // self.world
        idx = rows[self.rank * per:(self.rank + 1) * per]  # this rank's share
        out = []
        for s in range(0, len(idx), self.micro):
            sel = idx[s:s + self.micro]
            width = max(buf.lengths[i] for i in sel.tolist())  # right-padded to the longest row of the micro-batch
            out.append(PPOBatch(buf.tokens[sel, :width], buf.mask[sel, :width], buf.old_logp[sel, :width],
                                buf.old_values[sel, :width], buf.advantages[sel, :width],
                                buf.returns[sel, :width], buf.consts))
        return out

    @torch.no_grad()
    def rollout(self, it: int) -> Rollouts:
        cfg, model = self.cfg, self.model
        idx = self.prompt_indices(it)[self.rank::self.world]
        ctx = model.cfg.max_seq_len
        params = [cfg.sampling(min(cfg.max_new_tokens, ctx - len(self.prompt_ids[i])), seed=_seed(self.seed, it, i))
                  for i in idx]
        was_training = model.training
        model.eval()
        try:
            with self.autocast():
                answers = sample_answers(model.policy, [self.prompt_ids[i] for i in idx], params, self.stop_ids,
                                         self.pad_id, cfg.rollout_micro)
            seqs = [self.prompt_ids[i] + a for i, (a, _) in zip(idx, answers)]
            plen = [len(self.prompt_ids[i]) for i in idx]
            lengths = [len(s) for s in seqs]
            width = max(lengths)
            tokens = _pad_rows(seqs, self.pad_id, width)
            mask = torch.zeros(len(seqs), width, dtype=torch.bool)
            for r, (p, n) in enumerate(zip(plen, lengths)):
                mask[r, p - 1:n - 1] = True
            old_logp = torch.zeros(len(seqs), width)
            ref_logp = torch.zeros(len(seqs), width)
            old_values = torch.zeros(len(seqs), width)
            for s in range(0, len(seqs), cfg.rollout_micro):
                w = max(lengths[s:s + cfg.rollout_micro])
                x = tokens[s:s + cfg.rollout_micro, :w].to(self.device)
                with self.autocast():
                    logits, values = model(x)
                    old_logp[s:s + len(x), :w] = _logp_of(logits, x).cpu()
                    old_values[s:s + len(x), :w] = values.float().cpu()
                    if self.reference is None:
                        with adapters_off(model.policy):
                            ref = model.policy(x)
                    else:
                        ref = self.reference(x)
                    ref_logp[s:s + len(x), :w] = _logp_of(ref, x).cpu()
        finally:
            model.train(was_training)
        texts = [self.tok.decode([t for t in a if t not in self.stop_ids]) for a, _ in answers]
        convs = [self.prompts[i] for i in idx]
        raw = self.scorer(convs, texts, [a for a, _ in answers]).to(torch.float64).cpu()
        if raw.shape != (len(seqs),) or not bool(torch.isfinite(raw).all()):
            raise LlamalabError(f"ppo: the reward gave {tuple(raw.shape)} values (finite: "
                                f"{bool(torch.isfinite(raw).all())}) for {len(seqs)} answers")
        update_running(model.score_stats, raw)
        score = running_whiten(model.score_stats, raw)
        if cfg.score_clip:
            score = score.clamp(-cfg.score_clip, cfg.score_clip)
        kl_coef = float(model.kl_coef)
        maskf = mask.to(torch.float64)
        rewards = token_rewards(old_logp.double(), ref_logp.double(), score, mask, kl_coef)
        adv, ret = gae(rewards, old_values.double(), mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            adv = masked_whiten(adv, mask)
        kl_seq = ((old_logp.double() - ref_logp.double()) * maskf).sum(1)
        sums = _all_sum(torch.stack([torch.tensor(float(len(seqs)), dtype=torch.float64), raw.sum(), score.sum(),
                                     rewards.sum(), kl_seq.sum(), maskf.sum(),
                                     torch.tensor(float(sum(d == "stop" for _, d in answers)), dtype=torch.float64)]))
        n = float(sums[0])
        consts = {"iteration": float(it), "score": float(sums[1]) / n, "score_whitened": float(sums[2]) / n,
                  "reward": float(sums[3]) / n, "kl": float(sums[4]) / n, "kl_coef": kl_coef,
                  "answer_len": float(sums[5]) / n, "stopped": float(sums[6]) / n}
        if cfg.kl_target:
            model.kl_coef.fill_(adapt_kl(kl_coef, consts["kl"], cfg.kl_target, int(n), cfg.kl_horizon))
        samples = [{"prompt": self.tok.decode(self.prompt_ids[i]), "completion": texts[k], "score": float(raw[k]),
                    "iteration": it} for k, i in enumerate(idx[:3])]
        parts = (tokens, mask, old_logp, old_values, adv.float(), ret.float(), lengths)
        if self.world > 1:  # every rank holds the whole buffer, so minibatches do not depend on the world size
            parts = gather_rows(parts, self.world)
        buf = Rollouts(it, *parts[:6], parts[6], consts, samples)
        if self.on_rollout is not None:
            self.on_rollout(buf)
        return buf


def gather_rows(parts: tuple, world: int) -> tuple:
    """Every rank's rollout rows, in the global order (row g of the iteration was sampled by rank g % world).
    ``parts``: (B_local, T_local) tensors and a list of lengths; tensors are right-padded to the widest rank's."""
    got: list[Any] = [None] * world
    dist.all_gather_object(got, parts)
    width = max(p[0].shape[1] for p in got)
    n = sum(p[0].shape[0] for p in got)
    out: list[Any] = []
    for k in range(len(parts) - 1):
        full = torch.zeros((n, width), dtype=got[0][k].dtype)
        for r, p in enumerate(got):
            full[r::world, :p[k].shape[1]] = p[k]
        out.append(full)
    lengths = [0] * n
    for r, p in enumerate(got):
        lengths[r::world] = p[-1]
    return (*out, lengths)


def reference_model(policy: Transformer, path: str, lora: bool) -> Transformer | None:
    """The frozen reference: None under LoRA without ``path`` (the policy with adapters off), else a copy of the
    starting policy or the model at ``path``, in eval mode, without gradients."""
    if lora and not path:
        return None
    if path:
        from llamalab.model.folder import load

        ref = load(path, device="cpu", dtype=torch.float32).model
        if ref.cfg.vocab_size != policy.cfg.vocab_size:
            raise LlamalabError(f"--reference {path}: vocabulary of {ref.cfg.vocab_size} tokens, the policy's has "
                                f"{policy.cfg.vocab_size}")
    else:
        ref = copy.deepcopy(policy)
    ref.eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


# ----------------------------------------------------------------------------- building a run


@dataclass
class PPOGuardConfig(GuardConfig):
    spike_action: str = field(default="none", metadata={
        "help": "none: a PPO loss is centred near 0 (whitened advantages), so 'x times the recent mean' means "
                "nothing; NaN/Inf losses are still skipped"})


def encode_prompts(records: list[tuple[str, list[dict]]], tokenizer: Any, template: str, max_len: int,
                   ledger: Any) -> tuple[list[list[dict]], list[list[int]]]:
    """Each prompt (``(file:line, messages)`` from :func:`llamalab.align.data.read_prompts`) rendered with the
    generation prompt (the assistant header); prompts longer than ``max_len`` tokens are dropped and counted in
    ``ledger`` (reason ``prompt_too_long``, with their file:line). Returns (prompts kept, their ids)."""
    from llamalab.tokenizer.templates import render

    kept, ids = [], []
    for where, conv in records:
        x, _ = render(conv, template, tokenizer, add_generation_prompt=True)
        if len(x) > max_len:
            ledger.drop("prompt_too_long", where, f"prompt of {len(x)} tokens, more than the {max_len} a prompt may "
                                                  f"have (--ppo.max-prompt-len, or the context minus "
                                                  f"--ppo.max-new-tokens)")
            ledger.kept -= 1
            continue
        kept.append(conv)
        ids.append(x)
    return kept, ids


def build_ppo_model(policy: Transformer, lora: LoRAConfig, kl_coef: float) -> tuple[PPOModel, int]:
    """Policy + value model (a copy of the policy with a zero scalar head); with LoRA, adapters on both trunks and
    only adapters and the value head train. Returns (model, trainable parameters)."""
    from llamalab.finetune.lora import apply_lora

    value = ValueModel(copy.deepcopy(policy))
    if lora.rank:
        apply_lora(policy, lora)
        apply_lora(value.trunk, lora)
    model = PPOModel(policy, value, kl_coef)
    return model, sum(p.numel() for p in model.parameters() if p.requires_grad)


def shard_ppo_model(model: PPOModel, device: torch.device, param_dtype: torch.dtype | None = None) -> PPOModel:
    """``--parallel.strategy fsdp``: FSDP2 on the policy (its blocks, then the policy as a root) and on the value
    model (its trunk's blocks, then the value model as a root, which holds the trunk's embedding and norm and the
    value head), in place; the PPOModel itself stays plain (its running statistics are replicated buffers). Each root
    then runs one no-grad forward of one token (and reshards), so that FSDP takes it as the root before
    :func:`full_weights` calls blocks directly. NOTE: a collective; build the optimizer afterwards (parameters
    become DTensors)."""
    from llamalab.train.fsdp import apply_fsdp

    apply_fsdp(model.policy, device, param_dtype)
    apply_fsdp(model.value, device, param_dtype, blocks=model.value.trunk.layers)
    was = model.training
    model.eval()  # no dropout draws: the RNG stream stays that of an unsharded run
    with torch.no_grad():
        one = torch.zeros(1, 1, dtype=torch.long, device=device)
        for root in (model.policy, model.value):
            root(one)
            # NOTE: a root never reshards after forward; left gathered after this first (no-grad) forward, its
            # parameters would stay gathered through training and their gradients never be reduce-scattered
            root.reshard()
    model.train(was)
    return model


def build_scorer(reward_models: Sequence[str], reward_fns: Sequence[str], weights: Sequence[float], combine: str,
                 threshold: float, device: torch.device, batch_size: int) -> tuple[Scorer, list[dict[str, Any]]]:
    """Every reward model folder and scripted ``module:function`` as one scorer (:func:`combine_scores` of their
    scores, in the order given: models first); returns it with a record of each source for meta.json."""
    scorers: list[Scorer] = []
    records: list[dict[str, Any]] = []
    for path in reward_models:
        s, rec = reward_model_scorer(path, device, batch_size)
        scorers.append(s)
        records.append({"reward_model": rec})
    for spec in reward_fns:
        scorers.append(load_reward_fn(spec))
        records.append({"reward_fn": spec})
    if not scorers:
        raise LlamalabError("ppo: give a reward, --reward-model RM_FOLDER (llamalab rm) or --reward-fn module:function")
    if weights and len(weights) != len(scorers):
        raise LlamalabError(f"--reward-weights: {len(weights)} weights for {len(scorers)} rewards")
    if combine not in COMBINE:
        raise LlamalabError(f"--reward-combine: {combine!r}; choose one of {', '.join(COMBINE)}")

    def score(prompts: list[list[dict]], answers: list[str], ids: list[list[int]]) -> torch.Tensor:
        return combine_scores([s(prompts, answers, ids).to(torch.float64) for s in scorers], combine, weights,
                              threshold)
    return score, records


def iteration_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per iteration from metrics.jsonl rows: the rollout statistics and the mean of the update's."""
    keys = ("score", "reward", "kl", "kl_coef", "answer_len", "stopped")
    means = ("entropy", "clip_frac", "approx_kl", "value_loss", "policy_loss")
    by: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        if "iteration" in r:
            by.setdefault(int(round(r["iteration"])), []).append(r)
    out = []
    for it in sorted(by):
        rs = by[it]
        out.append({"iteration": it, "steps": [rs[0]["step"], rs[-1]["step"]], **{k: rs[0].get(k) for k in keys},
                    **{k: sum(r.get(k, 0.0) for r in rs) / len(rs) for k in means}})
    return out


def finish_ppo(run: Any, model: PPOModel, *, lora: LoRAConfig, tokenizer: Any, template: str, base_meta: dict,
               record: dict[str, Any], result: dict[str, Any], samples: list[dict[str, Any]]) -> dict[str, Any]:
    """After the last iteration (rank 0): ``model/`` (the policy, LoRA merged, with template and tokenizer),
    ``adapter/`` under LoRA, summary.json (per-iteration table), samples.json and report.html."""
    import json

    from llamalab.common import is_rank0, write_json_atomic
    from llamalab.finetune.lora import merge_lora, save_adapter
    from llamalab.finetune.outputs import gather_plain
    from llamalab.model.folder import save_model
    from llamalab.report.html import write_report
    from llamalab.train.fsdp import is_sharded

    rows = [json.loads(ln) for ln in run.metrics.read_text().splitlines()] if run.metrics.exists() else []
    table = iteration_table(rows)
    summary = {**result, "iterations": table, **record}
    if result["steps"] < result["planned_steps"]:
        print0(f"ppo: stopped at step {result['steps']}/{result['planned_steps']}; continue with --resume "
               f"(no model/ written yet)")
        return summary
    policy = model.policy
    if is_sharded(policy):
        policy = gather_plain(policy, lora)  # a collective: rank 0 gets the full policy (LoRA unmerged)
    if not is_rank0():
        return summary
    if lora.rank:
        summary["adapter"] = str(save_adapter(run.adapter, policy, lora, record["policy"]))
        merge_lora(policy)
    extra = {"chat_template": template, "ppo": {**record, "steps": result["steps"], "iterations": table[-1:]},
             **{k: base_meta[k] for k in ("tokenizer",) if k in base_meta}}
    summary["model"] = str(save_model(run.model, policy.cpu().float(), extra=extra, tokenizer=tokenizer))
    write_json_atomic(run.samples, samples)
    write_json_atomic(run.summary, summary)
    summary["report"] = str(write_report(run.root))
    first, last = (table[0], table[-1]) if table else ({}, {})
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    print0(f"ppo: done | {len(table)} iterations, {result['steps']} updates | score {fmt(first.get('score'))} -> "
           f"{fmt(last.get('score'))} | KL to the reference {fmt(first.get('kl'))} -> {fmt(last.get('kl'))} | "
           f"model {summary['model']}" + (f" | adapter {summary['adapter']}" if "adapter" in summary else "")
           + f" | report {summary['report']}")
    return summary
