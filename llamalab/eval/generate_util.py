"""A small batched generator for evaluation: greedy or sampled decoding with a KV cache and stop strings.

Prompts of different lengths are left-padded; an explicit attention mask hides the pads (each pad
position may attend only to itself, so no softmax row is empty and no NaN reaches the cache).
RoPE scores depend only on relative positions, so a left-padded row computes the same
continuation as the unpadded prompt (up to float rounding). Decoding stops for a row at EOS, at
the first stop string (the text is cut before it) or after ``max_new_tokens``.

Trade-off: this is a deliberately small loop (no paged cache, no continuous batching) kept here so
the harness does not depend on the inference engine; what it must be is exact for greedy
decoding, which the tests check against a token-by-token reference.
"""

from __future__ import annotations

from typing import Sequence

import torch

from llamalab.model import KVCache


def _first_stop(text: str, stop: Sequence[str]) -> int:
    cut = [text.find(s) for s in stop if s and s in text]
    return min(cut) if cut else -1


def _sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sp, si = probs.sort(-1, descending=True)
        keep = sp.cumsum(-1) - sp < top_p
        sp = sp * keep
        probs = torch.zeros_like(probs).scatter(-1, si, sp)
    return torch.multinomial(probs / probs.sum(-1, keepdim=True), 1, generator=gen)[:, 0]


@torch.no_grad()
def generate(model: torch.nn.Module, tokenizer, prompts: Sequence[str], max_new_tokens: int,
             temperature: float = 0.0, stop: Sequence[str] = (), top_p: float = 1.0, seed: int = 0,
             prompt_ids: Sequence[list[int]] | None = None) -> list[str]:
    """Continue each prompt (BOS prepended); returns the generated text only, cut at the first stop string."""
    ids = [list(p) for p in prompt_ids] if prompt_ids is not None else [tokenizer.encode(p, bos=True) for p in prompts]
    texts = []
    for new in generate_ids(model, ids, max_new_tokens, temperature, tokenizer, stop, top_p, seed):
        text = tokenizer.decode(new)
        cut = _first_stop(text, stop)
        texts.append(text if cut < 0 else text[:cut])
    return texts


@torch.no_grad()
def generate_ids(model: torch.nn.Module, prompts: Sequence[list[int]], max_new_tokens: int,
                 temperature: float = 0.0, tokenizer=None, stop: Sequence[str] = (), top_p: float = 1.0,
                 seed: int = 0) -> list[list[int]]:
    """Token-level generation for a batch of id lists; returns the new ids of each row (EOS excluded).

    Prompts longer than the context keep their last tokens; generation ends early when the context
    is full."""
    cfg = model.cfg
    device = next(model.parameters()).device
    max_len = cfg.max_seq_len
    prompts = [list(p)[-(max_len - 1):] for p in prompts]
    B, P = len(prompts), max(len(p) for p in prompts)
    steps = max(0, min(max_new_tokens, max_len - P))
    x = torch.zeros(B, P, dtype=torch.long)
    valid = torch.zeros(B, P + steps, dtype=torch.bool)
    for r, p in enumerate(prompts):
        x[r, P - len(p):] = torch.tensor(p)
        valid[r, P - len(p):] = True
    valid[:, P:] = True  # generated positions
    valid = valid.to(device)
    eye = torch.eye(P, P + steps, dtype=torch.bool, device=device)
    mask = (torch.ones(P, P + steps, dtype=torch.bool, device=device).tril() & valid[:, None, :]) | eye
    cache = KVCache(cfg, B, P + steps, dtype=next(model.parameters()).dtype, device=device)
    gen = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
    logits = model(x.to(device), cache, 0, mask[:, None, :, :P])[:, -1]
    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    eos = getattr(tokenizer, "eos_id", -1) if tokenizer is not None else -1
    for t in range(steps):
        nxt = _sample(logits.float(), temperature, top_p, gen)
        for r in range(B):
            if done[r]:
                continue
            tok = int(nxt[r])
            if tok == eos:
                done[r] = True
                continue
            out[r].append(tok)
            if stop and tokenizer is not None and _first_stop(tokenizer.decode(out[r][-32:]), stop) >= 0:
                done[r] = True
        if all(done) or t == steps - 1:
            break
        step_mask = valid[:, None, None, :P + t + 1]
        logits = model(nxt[:, None], cache, P + t, step_mask)[:, -1]
    return out
