"""Text generation and chat in a terminal: the loops behind ``llamalab generate`` and ``llamalab chat``.

Everything here writes to a stream it is given (stdout in the commands, a ``StringIO`` in tests) and
reads lines from an iterable, so the REPL is tested without a terminal.

Chat renders the whole conversation with the model's template (:mod:`llamalab.tokenizer.templates`,
the code SFT trains with) every turn instead of keeping a KV cache across turns: simpler, always
right after ``/reset`` or ``/system``, and cheap at the context lengths llamalab models have. When the
conversation outgrows the context, the oldest user/assistant pairs are dropped (the system prompt
is kept).
"""

from __future__ import annotations

import codecs
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, TextIO

from llamalab.common import LlamalabError
from llamalab.inference.engine import Engine
from llamalab.inference.sampling import SamplingParams
from llamalab.tokenizer.templates import render, stop_strings, stop_token_ids

# ----------------------------------------------------------------------------- generate


def read_prompts(prompt: str = "", prompts_file: str | Path = "") -> list[str]:
    """One prompt (backslash escapes such as ``\\n`` decoded) or a file's non-empty lines."""
    if prompt:
        return [codecs.decode(prompt, "unicode_escape")]
    path = Path(prompts_file)
    if not path.exists():
        raise LlamalabError(f"prompts file not found: {path}")
    prompts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise LlamalabError(f"{path}: no prompts (one per line)")
    return prompts


def generate_to(engine: Engine, prompts: list[str], params: SamplingParams, out: TextIO) -> list[str]:
    """One prompt streams its text to ``out``; several run batched and print one block each."""
    if len(prompts) == 1:
        out.write(prompts[0])
        parts = []
        for d in engine.stream(prompts[0], params):
            out.write(d.text)
            out.flush()
            parts.append(d.text)
        out.write("\n")
        return ["".join(parts)]
    outs = engine.generate(prompts, params)
    for p, o in zip(prompts, outs):
        out.write(f"=== {p}\n{p}{o.text}\n--- {len(o.token_ids)} tokens, {o.finish_reason}\n")
    return [o.text for o in outs]


# ----------------------------------------------------------------------------- chat


def chat_prompt(engine: Engine, messages: list[dict[str, str]], template: str, max_tokens: int) -> list[int]:
    """Render the conversation; drop the oldest user/assistant pairs until it fits the context."""
    msgs = list(messages)
    while True:
        ids, _ = render(msgs, template, engine.tokenizer, add_generation_prompt=True)
        if len(ids) + min(max_tokens, 64) < engine.max_seq_len:
            return ids
        first = 1 if msgs[0]["role"] == "system" else 0
        if len(msgs) - first <= 1:
            raise LlamalabError(f"the message is {len(ids)} tokens; the context is {engine.max_seq_len}")
        del msgs[first:first + 2]


def answer(engine: Engine, messages: list[dict[str, str]], template: str, params: SamplingParams,
           write: Callable[[str], None]) -> str:
    """Generate the assistant's reply to ``messages``, streaming it through ``write``."""
    ids = chat_prompt(engine, messages, template, params.max_tokens)
    room = engine.max_seq_len - len(ids)
    p = SamplingParams(**{**params.__dict__, "max_tokens": min(params.max_tokens, room),
                          "stop": list(params.stop) + stop_strings(template),
                          "stop_token_ids": list(params.stop_token_ids) + stop_token_ids(template, engine.tokenizer)})
    text, started = [], False
    for d in engine.stream(ids, p):
        t = d.text if started else d.text.lstrip()
        started = started or bool(t)
        if t:
            write(t)
            text.append(t)
    return "".join(text).strip()


def repl(engine: Engine, template: str, params: SamplingParams, system: str,
         lines: Iterable[str], out: TextIO) -> int:
    """The chat loop: ``/reset``, ``/system TEXT``, ``/quit``; returns the number of turns answered."""
    messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    turns = 0
    out.write(f"chat ({template} template; /reset, /system TEXT, /quit)\n")
    for line in lines:
        line = line.rstrip("\n")
        if line.strip() in ("/quit", "/exit"):
            break
        if line.strip() == "/reset":
            messages = [m for m in messages if m["role"] == "system"]
            out.write("(conversation cleared)\n")
            continue
        if line.startswith("/system "):
            rest = [m for m in messages if m["role"] != "system"]
            messages = [{"role": "system", "content": line[8:].strip()}] + rest
            out.write("(system prompt set)\n")
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        out.write("assistant: ")
        t0 = time.perf_counter()
        reply = answer(engine, messages, template, params, lambda s: (out.write(s), out.flush()))
        out.write(f"\n[{time.perf_counter() - t0:.1f}s]\n")
        messages.append({"role": "assistant", "content": reply})
        turns += 1
    return turns


def stdin_lines(prompt: str = "you: ") -> Iterator[str]:
    """Lines typed at an interactive prompt, until Ctrl-D."""
    while True:
        try:
            yield input(prompt)
        except EOFError:
            return
