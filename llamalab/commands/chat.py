"""Chat with a model in the terminal: ``llamalab chat MODEL``.

The conversation is rendered with the model's chat template (``config.json`` ``chat_template``,
or ``--chat-template``) by :mod:`llamalab.tokenizer.templates`, the same code SFT trains with, and the
answer streams as it is generated. Commands: ``/reset`` clears the conversation, ``/system TEXT``
sets the system prompt, ``/quit`` (or Ctrl-D) leaves. When the conversation outgrows the context,
the oldest turns are dropped. The loop itself is :mod:`llamalab.inference.terminal`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from llamalab.common import LlamalabError
from llamalab.inference.engine import Engine
from llamalab.inference.quantize import QUANT_CHOICES
from llamalab.inference.sampling import SamplingParams
from llamalab.inference.terminal import repl, stdin_lines
from llamalab.tokenizer.templates import TEMPLATES, resolve_template


@dataclass
class Config:
    model: str = field(default="", metadata={"positional": True,
                                                  "help": "model or run folder, HF LLaMA folder or .gguf file"})
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
        if not self.model:
            raise LlamalabError("chat needs a MODEL (model folder, run folder, HF folder or .gguf file)")


def main(cfg: Config) -> int:
    engine = Engine.from_folder(cfg.model, slots=1, quantize=cfg.quantize)
    template = resolve_template(engine.meta, cfg.chat_template or None)
    params = SamplingParams(max_tokens=cfg.max_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                            top_k=cfg.top_k, repetition_penalty=cfg.repetition_penalty, seed=cfg.seed).validate()
    lines = stdin_lines() if sys.stdin.isatty() else sys.stdin
    turns = repl(engine, template, params, cfg.system, lines, sys.stdout)
    print(f"chat: {turns} turn(s), {engine.stats['generated_tokens']} tokens generated", file=sys.stderr)
    return turns


if __name__ == "__main__":
    from llamalab.cli import stage_main

    stage_main(Config, main)
