"""Chat with a model in the terminal: ``llamalab chat CHECKPOINT``.

The conversation is rendered with the model's chat template (``config.json`` ``chat_template``,
or ``--chat-template``) by :mod:`llamalab.tokenizer.chat`, the same code SFT trains with, and the
answer streams as it is generated. Commands: ``/reset`` clears the conversation, ``/system TEXT``
sets the system prompt, ``/quit`` (or Ctrl-D) leaves. When the conversation outgrows the context,
the oldest turns are dropped.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, TextIO

from llamalab.common import LlamalabError
from llamalab.inference.engine import Engine
from llamalab.inference.quantize import QUANT_CHOICES
from llamalab.inference.sampling import SamplingParams
from llamalab.tokenizer.chat import TEMPLATES, render, resolve_template, stop_strings


@dataclass
class Config:
    checkpoint: str = field(default="", metadata={"positional": True, "help": "llamalab model folder"})
    chat_template: str = field(default="", metadata={"help": f"override: one of {', '.join(TEMPLATES)}"})
    system: str = field(default="", metadata={"help": "system prompt"})
    max_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    quantize: str = field(default="none", metadata={"choices": list(QUANT_CHOICES)})

    def validate(self) -> None:
        if not self.checkpoint:
            raise LlamalabError("chat needs a CHECKPOINT folder")


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
    ids = chat_prompt(engine, messages, template, params.max_tokens)
    room = engine.max_seq_len - len(ids)
    p = SamplingParams(**{**params.__dict__, "max_tokens": min(params.max_tokens, room),
                          "stop": list(params.stop) + stop_strings(template)})
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
            messages = [{"role": "system", "content": line[8:].strip()}] + [m for m in messages if m["role"] != "system"]
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


def _stdin_lines() -> Iterable[str]:
    while True:
        try:
            yield input("you: ")
        except EOFError:
            return


def main(cfg: Config) -> int:
    engine = Engine.from_folder(cfg.checkpoint, slots=1, quantize=cfg.quantize)
    template = resolve_template(engine.meta, cfg.chat_template or None)
    params = SamplingParams(max_tokens=cfg.max_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                            top_k=cfg.top_k, repetition_penalty=cfg.repetition_penalty, seed=cfg.seed).validate()
    lines = _stdin_lines() if sys.stdin.isatty() else sys.stdin
    turns = repl(engine, template, params, cfg.system, lines, sys.stdout)
    print(f"chat: {turns} turn(s), {engine.stats['generated_tokens']} tokens generated", file=sys.stderr)
    return turns


if __name__ == "__main__":
    from llamalab.cli import stage_main

    stage_main(Config, main)
