"""A model's own chat template (the Jinja text a GGUF or Hugging Face folder carries), used safely.

An imported model records its source's template in its meta: ``gguf_chat_template`` (GGUF
``tokenizer.chat_template``) or ``hf_chat_template`` (``tokenizer_config.json``). That template is
how the model was tuned, so serving it with another format (the ``llama2`` default) gets poor or
empty answers. :func:`chat_template_for` picks, in order: an explicit override, the folder's own
``chat_template`` name, the source template (one of ours when it renders exactly like one of ours,
see :func:`ours_by_content`, else a :class:`SourceTemplate`), and the ``llama2`` default.

:class:`SourceTemplate` renders the Jinja text the way Hugging Face ``apply_chat_template`` does
(``trim_blocks``, ``lstrip_blocks``, ``loopcontrols``, ``raise_exception``, a ``tojson`` that does
not HTML-escape), but in ``jinja2.sandbox.ImmutableSandboxedEnvironment``: the template comes from a
model file, so it gets no attribute access to Python internals, no mutation of its arguments and
ranges of at most 100,000 items; its output is capped (:data:`MAX_OUTPUT_CHARS` beyond the
conversation's own size). Special tokens (``<|im_start|>``, ``bos_token`` ...) become their ids only
where the *template* wrote them: text inside a message's content is encoded as plain text, so a user
typing ``<|im_end|>`` cannot close a turn (the same guarantee as :mod:`llamalab.tokenizer.templates`).

jinja2 is part of the ``serve`` extra (it comes with FastAPI's stack); it is imported where used.
"""

from __future__ import annotations

import json
import re
from typing import Any, Mapping, Sequence

from llamalab.common import LlamalabError

MAX_OUTPUT_CHARS = 1 << 20
# Turn closers written by common templates: generation stops on them (as ids when they are one token).
END_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
               "</s>", "[INST]", "<|user|>")
SOURCE_KEYS = (("gguf_chat_template", "GGUF tokenizer.chat_template"),
               ("hf_chat_template", "tokenizer_config.json chat_template"))
_PROBES: list[tuple[list[dict[str, str]], bool]] = [
    ([{"role": "user", "content": "Hello there"}], True),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}], True),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
      {"role": "user", "content": "Tell me a joke."}], True),
    ([{"role": "system", "content": "You are kind."}, {"role": "user", "content": "Hi"},
      {"role": "assistant", "content": "Hello."}], False),
]


def source_template_of(meta: Mapping[str, Any] | None) -> tuple[str, str] | None:
    """(Jinja text, where it came from) recorded by an import, or None."""
    for key, where in SOURCE_KEYS:
        value = (meta or {}).get(key)
        if isinstance(value, str) and value.strip():
            return value, where
    return None


def _environment() -> Any:
    try:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:
        raise LlamalabError("the model's own Jinja chat template needs jinja2: pip install 'llamalab[serve]'") from e

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"],
                                        autoescape=False)
    env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals["raise_exception"] = raise_exception
    return env


class SourceTemplate:
    """A Jinja chat template from a model file, rendered in a sandbox (see the module docstring)."""

    def __init__(self, source: str, where: str = "chat_template") -> None:
        from jinja2 import TemplateError

        self.source, self.where = source, where
        try:
            self.template = _environment().from_string(source)
        except TemplateError as e:
            raise LlamalabError(f"{where}: not a valid Jinja template ({e})") from None
        self._specials: dict[int, tuple[dict[str, int], Any]] = {}

    def __str__(self) -> str:
        return f"jinja ({self.where})"

    def render_text(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                    bos_token: str = "<s>", eos_token: str = "</s>") -> str:
        """The conversation as the template writes it; LlamalabError when the template refuses it or runs away."""
        from jinja2 import TemplateError

        msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
        limit = MAX_OUTPUT_CHARS + sum(len(m["content"]) for m in msgs) * 4
        out, n = [], 0
        try:
            for piece in self.template.generate(messages=msgs, add_generation_prompt=add_generation_prompt,
                                                bos_token=bos_token, eos_token=eos_token):
                out.append(piece)
                n += len(piece)
                if n > limit:
                    raise LlamalabError(f"{self.where}: the template wrote over {limit} characters; refused")
        except TemplateError as e:
            raise LlamalabError(f"{self.where}: the chat template refused the conversation ({e})") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, RecursionError, OverflowError,
                MemoryError) as e:
            raise LlamalabError(f"{self.where}: the chat template failed ({type(e).__name__}: {e})") from None
        return "".join(out)

    def render(self, messages: Sequence[Mapping[str, Any]], tokenizer: Any, add_generation_prompt: bool = True
               ) -> list[int]:
        """Token ids of the conversation: special tokens where the template wrote them, contents as plain text."""
        specials, plain = self._tokenizer_parts(tokenizer)
        bos = _piece(tokenizer, getattr(tokenizer, "bos_id", -1))
        eos = _piece(tokenizer, getattr(tokenizer, "eos_id", -1))
        text = self.render_text(messages, add_generation_prompt, bos, eos)
        # where each message's content sits in the output (in order; one not found verbatim stays template text)
        spans, cur = [], 0
        for m in messages:
            c = m["content"]
            j = text.find(c, cur) if c else -1
            if j >= 0:
                spans.append((j, j + len(c)))
                cur = j + len(c)
        pattern = re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True))) \
            if specials else None
        ids: list[int] = []
        run: list[str] = []

        def flush() -> None:
            if run:
                ids.extend(plain("".join(run)))
                run.clear()

        pos = 0
        for a, b in spans + [(len(text), len(text))]:
            seg = text[pos:a]  # template text: split on special tokens
            k = 0
            for mt in pattern.finditer(seg) if pattern else ():
                run.append(seg[k:mt.start()])
                flush()
                ids.append(specials[mt.group()])
                k = mt.end()
            run.append(seg[k:])
            run.append(text[a:b])  # a message's content: plain text
            pos = b
        flush()
        return ids

    def _tokenizer_parts(self, tok: Any) -> tuple[dict[str, int], Any]:
        """(special token text -> id, a function encoding text with no special-token matching)."""
        key = id(tok)
        if key not in self._specials:
            specials: dict[str, int] = {}
            plain = tok.encode
            hf = getattr(tok, "tk", None)
            sp = getattr(tok, "sp", None)
            if hf is not None:  # byte-level BPE (tokenizers): added special tokens
                from tokenizers import Tokenizer as HFTokenizer

                for i, added in hf.get_added_tokens_decoder().items():
                    if added.special:
                        specials[added.content] = int(i)
                raw = HFTokenizer.from_str(hf.to_str())
                raw.encode_special_tokens = True
                plain = lambda s, raw=raw: raw.encode(s, add_special_tokens=False).ids if s else []  # noqa: E731
            elif sp is not None:  # SentencePiece: control pieces (<s>, </s>); user text never matches them
                specials = {sp.IdToPiece(i): i for i in range(sp.GetPieceSize()) if sp.IsControl(i)}
            for i in (getattr(tok, "bos_id", -1), getattr(tok, "eos_id", -1)):
                if i is not None and i >= 0:
                    specials.setdefault(_piece(tok, i), i)
            specials.pop("", None)
            self._specials[key] = (specials, plain)
        return self._specials[key]

    def stop_strings(self) -> list[str]:
        """Turn closers the template writes (stop on them, as text or as ids)."""
        return [m for m in END_MARKERS if m in self.source]

    def stop_token_ids(self, tokenizer: Any) -> list[int]:
        """Ids that end a turn besides EOS: the tokenizer's own ``stop_ids`` and the closers the template writes."""
        specials, _ = self._tokenizer_parts(tokenizer)
        ids = set(getattr(tokenizer, "stop_ids", None) or []) | {specials[m] for m in self.stop_strings()
                                                                    if m in specials}
        return sorted(ids - {getattr(tokenizer, "eos_id", -1)})


def _piece(tok: Any, i: int) -> str:
    if i is None or i < 0:
        return ""
    own = getattr(tok, "token_text", None)
    return own(i) if own is not None else tok.id_to_piece(i)


# how our render_text may spell BOS/EOS per template besides <s> </s> (the Jinja side gets them as bos_token/eos_token)
_SPECIAL_TEXT = {"llama3": ("<|begin_of_text|>", "<|eot_id|>")}
# markers that name a template's family (for callers that need one of our names, see family_of)
_FAMILIES = (("<|start_header_id|>", "llama3"), ("<|im_start|>", "chatml"), ("[INST]", "llama2"),
             ("### Instruction", "alpaca"), ("ASSISTANT:", "vicuna"))


def ours_by_content(source: str) -> str | None:
    """The name of our template that renders exactly like ``source`` on a set of probe conversations, or None."""
    from llamalab.tokenizer.templates import TEMPLATES, render_text

    try:
        tpl = SourceTemplate(source)
    except LlamalabError:
        return None
    for name in TEMPLATES:
        for bos, eos in [("<s>", "</s>")] + ([_SPECIAL_TEXT[name]] if name in _SPECIAL_TEXT else []):
            try:
                if all(tpl.render_text(m, gen, bos, eos) == render_text(m, name, gen) for m, gen in _PROBES):
                    return name
            except LlamalabError:
                break
    return None


def family_of(source: str) -> str | None:
    """Our template of the same family as ``source`` by its turn markers (ChatML, Llama 2/3, Alpaca, Vicuna), or None.

    Not exact (a default system prompt, say, is not kept): for callers that can only take one of our
    names (``chat``, SFT); the server renders a non-identical source template itself.
    """
    from llamalab.tokenizer.templates import TEMPLATES

    return next((name for marker, name in _FAMILIES if marker in source and name in TEMPLATES), None)


def chat_template_for(meta: Mapping[str, Any] | None, override: str | None = None) -> str | SourceTemplate:
    """The template to chat with: override, the folder's ``chat_template``, the source's (ours or Jinja), llama2."""
    from llamalab.tokenizer.templates import resolve_template

    if override or (meta or {}).get("chat_template"):
        return resolve_template(meta, override)
    found = source_template_of(meta)
    if found is None:
        return resolve_template(meta)
    source, where = found
    return ours_by_content(source) or SourceTemplate(source, where)
