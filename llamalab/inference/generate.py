"""Generate text from a model folder: ``llamalab generate CHECKPOINT --prompt "Once upon a time"``.

One prompt streams its text to stdout as it is produced; several prompts (a file with one prompt
per line, ``--prompts-file``) run batched through the engine and print one block each. A summary line (tokens, seconds, tokens/s) goes to stderr.
"""

from __future__ import annotations

import codecs
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llamalab.common import LlamalabError
from llamalab.inference.engine import Engine
from llamalab.inference.quantize import QUANT_CHOICES
from llamalab.inference.sampling import SamplingParams


@dataclass
class Config:
    checkpoint: str = field(default="", metadata={"positional": True, "help": "llamalab model folder"})
    prompt: str = field(default="", metadata={"help": "prompt text (BOS is prepended)"})
    prompts_file: str = field(default="", metadata={"help": "a file with one prompt per line (batched)"})
    max_tokens: int = 256
    temperature: float = field(default=0.8, metadata={"help": "0 = greedy"})
    top_k: int = field(default=0, metadata={"help": "0 = off"})
    top_p: float = 0.95
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list, metadata={
        "help": "comma-separated stop strings; backslash escapes such as \\n are decoded"})
    quantize: str = field(default="none", metadata={"choices": list(QUANT_CHOICES),
                                                    "help": "int8: int8 weights, fastest on CPU"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the decode step (slow start)"})
    slots: int = field(default=8, metadata={"help": "requests decoded together"})
    threads: int = field(default=0, metadata={"help": "torch threads (0 = torch default)"})

    def validate(self) -> None:
        if not self.checkpoint:
            raise LlamalabError("generate needs a CHECKPOINT folder")
        if bool(self.prompt) == bool(self.prompts_file):
            raise LlamalabError("give exactly one of --prompt or --prompts-file")

    def sampling(self) -> SamplingParams:
        stops = [codecs.decode(s, "unicode_escape") for s in self.stop]
        return SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature, top_k=self.top_k,
                              top_p=self.top_p, repetition_penalty=self.repetition_penalty, seed=self.seed,
                              stop=stops).validate()


def read_prompts(cfg: Config) -> list[str]:
    if cfg.prompt:
        return [codecs.decode(cfg.prompt, "unicode_escape")]
    path = Path(cfg.prompts_file)
    if not path.exists():
        raise LlamalabError(f"prompts file not found: {path}")
    prompts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise LlamalabError(f"{path}: no prompts (one per line)")
    return prompts


def main(cfg: Config) -> list[str]:
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    params = cfg.sampling()
    prompts = read_prompts(cfg)
    engine = Engine.from_folder(cfg.checkpoint, slots=cfg.slots, quantize=cfg.quantize, compile=cfg.compile)
    t0 = time.perf_counter()
    if len(prompts) == 1:
        sys.stdout.write(prompts[0])
        parts = []
        for d in engine.stream(prompts[0], params):
            sys.stdout.write(d.text)
            sys.stdout.flush()
            parts.append(d.text)
        sys.stdout.write("\n")
        texts = ["".join(parts)]
    else:
        outs = engine.generate(prompts, params)
        texts = [o.text for o in outs]
        for p, o in zip(prompts, outs):
            print(f"=== {p}\n{p}{o.text}\n--- {len(o.token_ids)} tokens, {o.finish_reason}")
    dt = time.perf_counter() - t0
    n = engine.stats["generated_tokens"]
    print(f"generate: {len(prompts)} prompt(s), {engine.stats['prompt_tokens']} prompt tokens, {n} new tokens "
          f"in {dt:.2f}s ({n / max(dt, 1e-9):.1f} tokens/s, quantize={cfg.quantize})", file=sys.stderr)
    return texts


if __name__ == "__main__":
    from llamalab.cli import stage_main

    stage_main(Config, main)
