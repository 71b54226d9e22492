"""Run EleutherAI's lm-evaluation-harness on a llamalab model folder, for scores comparable with
published ones.

Two ways (details in docs/eval.md):

1. In process, with the model class registered here as ``llamalab``::

       pip install 'llamalab[lm-eval]'
       llamalab eval harness runs/tiny --tasks hellaswag,arc_easy --limit 100 --output lm-eval-out/
       python -m llamalab.eval.lm_eval_adapter run --model llamalab \\
           --model_args pretrained=runs/tiny/checkpoints/step_001000/model,batch_size=16 --tasks hellaswag,arc_easy

   The first is :func:`evaluate_with_harness` (lm-eval's ``simple_evaluate``); the second is
   lm-eval's own CLI with the class registered. From Python: ``register();
   lm_eval.simple_evaluate(model="llamalab", model_args="pretrained=...", tasks=[...])``.

2. Over HTTP, against ``llamalab serve`` with lm-eval's ``local-completions`` model; log-likelihood
   tasks need the server to return prompt log-probabilities (lm-eval sends ``echo: true, logprobs: 1,
   max_tokens: 1`` and drops the last returned token, the generated one, EOS included), generation
   tasks need only ``/v1/completions``.

The three request types map onto llamalab's own scoring, so both harnesses tokenize and score the
same way: ``loglikelihood`` -> :func:`llamalab.eval.loglik.score_text_pairs` (lm-eval's pair
encoding, BOS first by the tokenizer's rule, left truncation); ``loglikelihood_rolling`` ->
non-overlapping windows with full context for the last one, after lm-eval's prefix token (BOS, else
EOS), as lm-eval specifies; ``generate_until`` -> greedy (or sampled, if ``do_sample``/``temperature``
is asked for) decoding through :class:`llamalab.inference.engine.Engine` (the sampler of ``generate``
and ``serve``) until a stop string, EOS or ``max_gen_toks``. The model loads on the device lm-eval
asks for when the machine has it, else on the machine's own (:func:`available_device`).

:class:`LlamalabLMCore` holds the logic without importing lm_eval (tests use it directly);
:func:`register` builds the lm_eval subclass when lm_eval is installed.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from llamalab.common import LlamalabError

if TYPE_CHECKING:
    from llamalab.inference.engine import Engine


class LlamalabLMCore:
    """lm-eval's three request types over a llamalab model folder (or an already loaded model)."""

    def __init__(self, pretrained: str | Path | None = None, batch_size: int | str = 16, device: str = "auto",
                 dtype: str = "auto", max_gen_toks: int | str = 256, model=None, tokenizer=None, **_: Any) -> None:
        if model is None:
            if pretrained is None:
                raise LlamalabError("lm_eval model_args: give pretrained=<llamalab model folder>")
            from llamalab.eval.run import load_for_eval

            loaded = load_for_eval(pretrained, available_device(device), dtype)
            model, tokenizer = loaded.model, loaded.tokenizer
        self.model, self.tok = model, tokenizer
        self.batch_size = 16 if str(batch_size).startswith("auto") else int(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        self.max_length = model.cfg.max_seq_len
        self._engine = None

    @property
    def engine(self) -> Engine:
        """The inference engine that decodes ``generate_until`` (built on first use: it copies the weights)."""
        if self._engine is None:
            from llamalab.inference.engine import Engine

            self._engine = Engine(self.model, self.tok, slots=self.batch_size)
        return self._engine

    # -- requests as plain tuples
    def loglikelihood_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        from llamalab.eval.loglik import model_logits_fn, score_text_pairs

        scored = score_text_pairs(model_logits_fn(self.model), self.tok, list(pairs), self.max_length, self.batch_size)
        return [(s.loglik, s.is_greedy) for s in scored]

    def rolling(self, texts: Sequence[str]) -> list[float]:
        from llamalab.eval.loglik import document_nll, model_logits_fn, prefix_ids

        fn = model_logits_fn(self.model)
        first = prefix_ids(self.tok)  # lm-eval's prefix token: BOS, else EOS
        return [-document_nll(fn, first + self.tok.encode(t), self.max_length, self.max_length)[0] for t in texts]

    def generate(self, requests: Sequence[tuple[str, dict[str, Any]]]) -> list[str]:
        """Requests grouped by identical generation settings, each group decoded in batches."""
        from llamalab.eval.generative import generate_texts

        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, (_, kw) in enumerate(requests):
            groups.setdefault(repr(sorted((kw or {}).items())), []).append(i)
        for idx in groups.values():
            kw = dict(requests[idx[0]][1] or {})
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kw.get("max_gen_toks", self.max_gen_toks))
            temp = float(kw.get("temperature", 0.0)) if kw.get("do_sample", False) or kw.get("temperature") else 0.0
            texts = generate_texts(self.engine, [requests[i][0] for i in idx], max_new, temp, until,
                                   top_p=float(kw.get("top_p", 1.0)), seed=int(kw.get("seed", 0)))
            for i, t in zip(idx, texts):
                out[i] = t
        return out  # type: ignore[return-value]


EXTRA = "pip install 'llamalab[lm-eval]'"


def available_device(device: str | None) -> str:
    """The device to load on: ``auto`` (the machine's best) for none, and for a device this machine lacks.

    lm-eval hands every model class its ``--device`` (``cuda`` or ``cuda:0`` by default in several of its
    versions and front ends), so on a CPU-only machine or a Mac the request is for a GPU that is not there;
    the machine's own device is used instead, said on stderr."""
    import torch

    if device in (None, "", "auto"):
        return "auto"
    kind = str(device).split(":")[0]
    present = {"cuda": torch.cuda.is_available(),
               "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()}
    if kind in present and not present[kind]:
        print(f"lm-eval asked for device {device!r}, which this machine does not have; using the machine's own "
              f"(auto)", file=sys.stderr)
        return "auto"
    return str(device)


def register():
    """Define and register the lm_eval model class ``llamalab``; returns the class."""
    try:
        from lm_eval.api.model import LM
        from lm_eval.api.registry import register_model
    except ImportError:
        raise LlamalabError(f"lm-evaluation-harness (lm_eval) is not installed; {EXTRA}") from None
    try:
        from lm_eval.api.registry import get_model

        return get_model("llamalab")  # already registered
    except Exception:  # noqa: BLE001 - lm_eval raises different errors across versions for an unknown name
        pass

    @register_model("llamalab")
    class LlamalabLM(LM):
        def __init__(self, pretrained: str | None = None, **kwargs: Any) -> None:
            super().__init__()
            self.core = LlamalabLMCore(pretrained, **kwargs)

        def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            return self.core.loglikelihood_pairs([tuple(r.args) for r in requests])

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            return self.core.rolling([r.args[0] for r in requests])

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            return self.core.generate([(r.args[0], r.args[1]) for r in requests])

    return LlamalabLM


def evaluate_with_harness(model: str | Path, tasks: Sequence[str], limit: int | None = None,
                          num_fewshot: int | None = None, batch_size: int = 16, device: str = "auto",
                          dtype: str = "auto", max_gen_toks: int = 256) -> dict[str, Any]:
    """lm-eval's ``simple_evaluate`` on our model class (built here, so no model_args string to parse);
    returns lm-eval's result dict. lm-eval loads (and may download) each task's data itself."""
    cls = register()
    from lm_eval.evaluator import simple_evaluate

    lm = cls(pretrained=str(model), batch_size=batch_size, device=device, dtype=dtype, max_gen_toks=max_gen_toks)
    return simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit)


def main() -> None:
    """``python -m llamalab.eval.lm_eval_adapter <lm_eval arguments>``: lm_eval's own CLI, ``llamalab`` registered."""
    try:
        register()
        from lm_eval.__main__ import cli_evaluate
    except LlamalabError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    cli_evaluate()


if __name__ == "__main__":
    main()
