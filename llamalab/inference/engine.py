"""The generation engine: requests in, tokens and text out, with continuous batching.

``Engine`` owns a :class:`~llamalab.inference.runner.Runner` (fused weights + a KV cache of
``slots`` rows) and a queue of requests. Each :meth:`Engine.step` admits waiting requests into free
slots (prefill, first token), then decodes one token for every active request in one batched
forward pass. A finished request frees its slot at once and the next waiting one takes it, so
requests of different lengths share the batch without padding (iteration-level scheduling, as in
Orca / vLLM). Requests are independent: each has its own position, seed and parameters, so a
request produces the same tokens alone or batched (tested).

Text comes out incrementally: tokens are detokenised with a sliding window (so SentencePiece's
leading spaces and multi-byte characters split across byte-fallback tokens come out right), and
text that could be the start of a stop string is held back until it is known not to be one, so a
stream never shows a stop string and streaming text equals non-streaming text.

``generate`` and ``stream`` are the simple front doors; the server drives ``add``/``step`` from
its own thread.

A failure is confined to the request that caused it: an exception while admitting one request
(prefill), sampling its row or detokenising its token ends that request alone with
``finish_reason="error"`` (and ``Delta.error``), and the others go on untouched. Only a failure of the
batched decode forward itself, which belongs to no single request, ends the requests in that batch;
waiting requests and the engine survive it.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

import torch

from llamalab.common import LlamalabError
from llamalab.inference.runner import Runner
from llamalab.inference.sampling import SamplingParams, choose, make_generator, top_logprobs
from llamalab.model.transformer import Transformer


class TokenizerLike(Protocol):
    bos_id: int
    eos_id: int

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def id_to_piece(self, i: int) -> str: ...


# ----------------------------------------------------------------------------- outputs


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Delta:
    """What one step produced for one request (a stream chunk)."""
    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    prompt_logprobs: list[TokenLogprob | None] | None = None  # on a request's first delta, when asked
    error: str | None = None  # with finish_reason "error": what failed


@dataclass
class Output:
    request_id: str
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # None for the first prompt token
    seconds: float = 0.0


class IncrementalDetokenizer:
    """Text of a growing token list, emitted piece by piece (vLLM's prefix/read offsets).

    Decoding the window ids[prefix:] and subtracting the text of ids[prefix:read] keeps
    SentencePiece's leading space of each piece; a trailing U+FFFD means a multi-byte character is
    still incomplete, so nothing is emitted until its last byte arrives.
    """

    def __init__(self, tokenizer: TokenizerLike, context: Sequence[int]) -> None:
        self.tok = tokenizer
        self.ids: list[int] = list(context[-4:])
        self.prefix = 0
        self.read = len(self.ids)

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix_text = self.tok.decode(self.ids[self.prefix:self.read])
        new_text = self.tok.decode(self.ids[self.prefix:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(prefix_text):]
            self.prefix, self.read = self.read, len(self.ids)
            return delta
        return ""

    def flush(self) -> str:
        prefix_text = self.tok.decode(self.ids[self.prefix:self.read])
        new_text = self.tok.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return new_text[len(prefix_text):] if len(new_text) > len(prefix_text) else ""


def stop_hold(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


# ----------------------------------------------------------------------------- sequences


@dataclass
class _Seq:
    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    gen: torch.Generator
    detok: IncrementalDetokenizer
    t0: float
    out_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    text: str = ""
    emitted: int = 0
    pending: int = -1  # sampled, not yet fed to the model
    finish_reason: str | None = None
    error: str | None = None


class Engine:
    """Batched generation over a model and its tokenizer (see the module docstring)."""

    def __init__(self, model: Transformer, tokenizer: TokenizerLike, slots: int = 8,
                 max_seq_len: int | None = None, quantize: str = "none", compile: bool = False,
                 meta: dict[str, Any] | None = None) -> None:
        if slots < 1:
            raise LlamalabError(f"slots must be >= 1, got {slots}")
        self.tokenizer = tokenizer
        self.meta = meta or {}
        self.cfg = model.cfg
        self.runner = Runner(model, slots=slots, max_seq_len=max_seq_len, quantize=quantize, compile=compile)
        self.max_seq_len = self.runner.max_seq_len
        self.slots = slots
        self.vocab_size = model.cfg.vocab_size
        dev = self.runner.device
        self.counts = torch.zeros(slots, self.vocab_size, dtype=torch.float32, device=dev)
        self.prompt_seen = torch.zeros(slots, self.vocab_size, dtype=torch.bool, device=dev)
        self.waiting: list[_Seq] = []
        self.active: list[_Seq] = []  # active[i] lives in runner slot i
        self._ids = itertools.count()
        self.stats = {"prompt_tokens": 0, "generated_tokens": 0, "requests": 0, "decode_steps": 0,
                      "aborted": 0, "failed": 0}

    @classmethod
    def from_folder(cls, folder: str | Path, slots: int = 8, quantize: str = "none", compile: bool = False,
                    max_seq_len: int | None = None, dtype: torch.dtype = torch.float32,
                    device: str = "cpu") -> "Engine":
        """An engine over anything :func:`llamalab.model.folder.load` reads (model/run/HF folder, .gguf)."""
        from llamalab.model.folder import load

        loaded = load(folder, device=device, dtype=dtype)
        return cls(loaded.model, loaded.tokenizer, slots=slots, max_seq_len=max_seq_len, quantize=quantize,
                   compile=compile, meta=loaded.meta)

    # ------------------------------------------------------------------ requests

    def check_prompt(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        """Raise LlamalabError if the request cannot run (empty, too long, bad ids or parameters)."""
        params.validate()
        n = len(prompt_ids)
        if n == 0:
            raise LlamalabError("prompt: empty (no tokens)")
        if n >= self.max_seq_len:
            raise LlamalabError(f"prompt: {n} tokens, but the model's context is {self.max_seq_len} tokens "
                                f"(the prompt must leave room for at least one new token)")
        bad = [i for i in prompt_ids if not 0 <= int(i) < self.vocab_size]
        if bad:
            raise LlamalabError(f"prompt: token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")

    def add(self, prompt_ids: Sequence[int], params: SamplingParams | None = None,
            request_id: str | None = None) -> str:
        params = params or SamplingParams()
        self.check_prompt(prompt_ids, params)
        rid = request_id or f"req-{next(self._ids)}"
        ids = [int(i) for i in prompt_ids]
        seq = _Seq(rid, ids, params, make_generator(params.seed), IncrementalDetokenizer(self.tokenizer, ids),
                   time.perf_counter())
        self.waiting.append(seq)
        return rid

    def abort(self, request_id: str) -> None:
        n = len(self.waiting)
        self.waiting = [s for s in self.waiting if s.rid != request_id]
        self.stats["aborted"] += n - len(self.waiting)
        for s in self.active:
            if s.rid == request_id and s.finish_reason is None:
                s.finish_reason = "abort"
                self.stats["aborted"] += 1

    def has_work(self) -> bool:
        return bool(self.waiting or self.active)

    # ------------------------------------------------------------------ the loop

    def step(self) -> list[Delta]:
        """Admit waiting requests into free slots, then decode one token for every active one."""
        deltas: list[Delta] = []
        while self.waiting and len(self.active) < self.slots:
            seq = self.waiting.pop(0)
            try:
                deltas.append(self._admit(seq))
            except Exception as e:  # noqa: BLE001 - this request fails alone
                deltas.append(self._fail(seq, e))
        self._retire()
        live = [s for s in self.active if s.pending >= 0]
        if live:
            n = len(self.active)
            tokens = torch.tensor([s.pending for s in self.active], dtype=torch.long, device=self.runner.device)
            try:
                logits = self.runner.decode(tokens)
            except Exception as e:  # noqa: BLE001 - the batched forward belongs to every request in it
                deltas.extend(self._fail(s, e) for s in self.active if s.finish_reason is None)
                self._retire()
                return deltas
            self.stats["decode_steps"] += 1
            deltas.extend(self._sample_and_emit(self.active[:n], logits))
            self._retire()
        return deltas

    def _fail(self, seq: _Seq, e: Exception) -> Delta:
        """End one request with finish_reason "error" (its slot is freed by the next ``_retire``)."""
        seq.finish_reason, seq.pending = "error", -1
        seq.error = str(e) if isinstance(e, LlamalabError) else f"{type(e).__name__}: {e}"
        self.stats["failed"] += 1
        return Delta(seq.rid, "", [], [], True, "error", error=seq.error)

    def _admit(self, seq: _Seq) -> Delta:
        slot = len(self.active)
        self.active.append(seq)
        p = seq.params
        logits = self.runner.prefill(slot, seq.prompt_ids, all_logits=p.prompt_logprobs is not None)
        self.stats["prompt_tokens"] += len(seq.prompt_ids)
        self.stats["requests"] += 1
        self.counts[slot].zero_()
        self.prompt_seen[slot].zero_()
        if p.repetition_penalty != 1.0:
            self.prompt_seen[slot, torch.tensor(seq.prompt_ids, device=self.prompt_seen.device)] = True
        if p.prompt_logprobs is not None:
            seq.prompt_logprobs = self._prompt_logprobs(seq.prompt_ids, logits, p.prompt_logprobs)
            logits = logits[-1:]
        delta = self._sample_and_emit([seq], logits, slot0=slot)[0]
        delta.prompt_logprobs = seq.prompt_logprobs
        return delta

    @staticmethod
    def _prompt_logprobs(ids: list[int], logits: torch.Tensor, k: int) -> list[TokenLogprob | None]:
        lp = torch.log_softmax(logits[:-1].float(), dim=-1)  # position t predicts token t+1
        nxt = torch.tensor(ids[1:], dtype=torch.long, device=lp.device)
        chosen = lp.gather(1, nxt[:, None])[:, 0].tolist()
        tops = torch.topk(lp, k) if k > 0 else None
        out: list[TokenLogprob | None] = [None]
        for t, (tid, c) in enumerate(zip(ids[1:], chosen)):
            top = list(zip(tops.indices[t].tolist(), tops.values[t].tolist())) if tops is not None else []
            out.append(TokenLogprob(tid, c, top))
        return out

    def _sample_and_emit(self, seqs: list[_Seq], logits: torch.Tensor, slot0: int = 0) -> list[Delta]:
        n = len(seqs)
        params = [s.params for s in seqs]
        counts = self.counts[slot0:slot0 + n]
        seen = self.prompt_seen[slot0:slot0 + n]
        failed: dict[int, Exception] = {}
        chosen = choose(logits, params, [s.gen for s in seqs], counts, seen, on_error=failed.__setitem__)
        safe = [max(t, 0) for t in chosen]
        lps = top_logprobs(logits, safe, [None if i in failed else p.logprobs for i, p in enumerate(params)])
        rows = [i for i, p in enumerate(params) if p.penalised and i not in failed]
        if rows:
            counts[torch.tensor(rows, device=counts.device), torch.tensor([chosen[i] for i in rows],
                                                                          device=counts.device)] += 1
        out = []
        for i, (s, t, lp) in enumerate(zip(seqs, chosen, lps)):
            if i in failed:
                out.append(self._fail(s, failed[i]))
                continue
            try:
                out.append(self._emit(s, t, lp))
            except Exception as e:  # noqa: BLE001 - e.g. the detokeniser: this request fails alone
                out.append(self._fail(s, e))
        return out

    def _emit(self, seq: _Seq, token: int, lp: tuple[float, list[tuple[int, float]]] | None) -> Delta:
        p = seq.params
        seq.pending = -1
        new_text, new_ids, new_lps = "", [], []
        if seq.finish_reason == "abort":
            pass
        elif (token == self.tokenizer.eos_id and not p.ignore_eos) or token in p.stop_token_ids:
            seq.finish_reason = "stop"
            new_text = seq.detok.flush()
        else:
            seq.out_ids.append(token)
            new_ids = [token]
            self.stats["generated_tokens"] += 1
            if lp is not None:
                tl = TokenLogprob(token, lp[0], lp[1])
                seq.logprobs.append(tl)
                new_lps = [tl]
            new_text = seq.detok.add(token)
            total = len(seq.prompt_ids) + len(seq.out_ids)
            if len(seq.out_ids) >= p.max_tokens or total >= self.max_seq_len:
                seq.finish_reason = "length"
                new_text += seq.detok.flush()
            else:
                seq.pending = token
        if new_text:
            start = max(0, len(seq.text) - max((len(s) for s in p.stop), default=0))
            seq.text += new_text
            cut = _find_stop(seq.text, p.stop, start)
            if cut is not None:
                seq.text = seq.text[:cut]
                seq.finish_reason = "stop"
                seq.pending = -1
        safe = len(seq.text) if seq.finish_reason else len(seq.text) - stop_hold(seq.text, p.stop)
        out_text = seq.text[seq.emitted:safe] if safe > seq.emitted else ""
        seq.emitted = max(seq.emitted, safe)
        return Delta(seq.rid, out_text, new_ids, new_lps, seq.finish_reason is not None, seq.finish_reason)

    def _retire(self) -> None:
        """Free the slots of finished requests, moving the last active slot into each hole."""
        i = 0
        while i < len(self.active):
            if self.active[i].finish_reason is None:
                i += 1
                continue
            last = len(self.active) - 1
            if i != last:
                self.runner.move_slot(last, i)
                self.counts[i] = self.counts[last]
                self.prompt_seen[i] = self.prompt_seen[last]
                self.active[i] = self.active[last]
            self.active.pop()
            self.runner.free_slot(last)

    # ------------------------------------------------------------------ front doors

    def output_of(self, seq: _Seq) -> Output:
        return Output(seq.rid, seq.prompt_ids, seq.out_ids, seq.text, seq.finish_reason or "length",
                      seq.logprobs if seq.params.logprobs is not None else None, seq.prompt_logprobs,
                      time.perf_counter() - seq.t0)

    def encode(self, prompt: str | Sequence[int], bos: bool | None = None) -> list[int]:
        bos = getattr(self.tokenizer, "add_bos", True) if bos is None else bos  # the tokenizer's own BOS rule
        return self.tokenizer.encode(prompt, bos=bos) if isinstance(prompt, str) else [int(i) for i in prompt]

    def generate(self, prompts: Sequence[str | Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[Output]:
        """Run every prompt to completion (batched ``slots`` at a time); outputs in prompt order."""
        plist = list(params) if isinstance(params, (list, tuple)) else [params or SamplingParams()] * len(prompts)
        if len(plist) != len(prompts):
            raise LlamalabError(f"generate: {len(prompts)} prompts but {len(plist)} SamplingParams")
        seqs: dict[str, _Seq] = {}
        order = []
        for pr, p in zip(prompts, plist):
            rid = self.add(self.encode(pr), p)
            order.append(rid)
            seqs[rid] = self.waiting[-1]
        while any(s.finish_reason is None for s in seqs.values()):
            self.step()
        return [self.output_of(seqs[r]) for r in order]

    def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None) -> Iterator[Delta]:
        """Yield text deltas of one request as they are produced."""
        rid = self.add(self.encode(prompt), params)
        done = False
        while not done:
            for d in self.step():
                if d.request_id == rid:
                    done = done or d.finished
                    yield d


def _find_stop(text: str, stops: Sequence[str], start: int) -> int | None:
    best = None
    for s in stops:
        j = text.find(s, start)
        if j >= 0 and (best is None or j < best):
            best = j
    return best


def token_text(tokenizer: TokenizerLike, token_id: int) -> str:
    """The text of one token as it appears inside a sequence (SentencePiece '▁' -> space, <0x..> bytes)."""
    own = getattr(tokenizer, "token_text", None)
    if own is not None:
        return own(token_id)
    piece = tokenizer.id_to_piece(token_id)
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        try:
            return bytes([int(piece[3:5], 16)]).decode("utf-8", errors="replace")
        except ValueError:
            return piece
    return piece.replace("\u2581", " ")
