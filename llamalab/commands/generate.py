"""Generate text from a model: ``llamalab generate MODEL --prompt "Once upon a time"``.

MODEL is anything :func:`llamalab.model.folder.load` reads (a model or run folder, a Hugging
Face LLaMA folder, a .gguf file).

One prompt streams its text to stdout as it is produced; several prompts (a file with one prompt
per line, ``--prompts-file``) run batched through the engine and print one block each
(:mod:`llamalab.inference.terminal`). A summary line (tokens, seconds, tokens/s) goes to stderr.
"""

from __future__ import annotations

import codecs
import sys
import time
from dataclasses import dataclass, field

import torch

from llamalab.common import LlamalabError
from llamalab.inference.engine import Engine
from llamalab.inference.quantize import QUANT_CHOICES
from llamalab.inference.sampling import SamplingParams
from llamalab.inference.terminal import generate_to, read_prompts


@dataclass
class Config:
    model: str = field(default="", metadata={"positional": True,
                                                  "help": "model or run folder, HF LLaMA folder or .gguf file"})
    prompt: str = field(default="", metadata={"help": "prompt text (BOS first only if the tokenizer adds it)"})
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
                                                    "help": "CPU weights: int8 (q8_0 blocks), int8-wo, int4"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the decode step (slow start)"})
    slots: int = field(default=8, metadata={"help": "requests decoded together"})
    threads: int = field(default=0, metadata={"help": "torch threads (0 = torch default)"})

    def validate(self) -> None:
        if not self.model:
            raise LlamalabError("generate needs a MODEL (model folder, run folder, HF folder or .gguf file)")
        if bool(self.prompt) == bool(self.prompts_file):
            raise LlamalabError("give exactly one of --prompt or --prompts-file")

    def sampling(self) -> SamplingParams:
        stops = [codecs.decode(s, "unicode_escape") for s in self.stop]
        return SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature, top_k=self.top_k,
                              top_p=self.top_p, repetition_penalty=self.repetition_penalty, seed=self.seed,
                              stop=stops).validate()


def main(cfg: Config) -> list[str]:
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    params = cfg.sampling()
    prompts = read_prompts(cfg.prompt, cfg.prompts_file)
    engine = Engine.from_folder(cfg.model, slots=cfg.slots, quantize=cfg.quantize, compile=cfg.compile)
    t0 = time.perf_counter()
    texts = generate_to(engine, prompts, params, sys.stdout)
    dt = time.perf_counter() - t0
    n = engine.stats["generated_tokens"]
    print(f"generate: {len(prompts)} prompt(s), {engine.stats['prompt_tokens']} prompt tokens, {n} new tokens "
          f"in {dt:.2f}s ({n / max(dt, 1e-9):.1f} tokens/s, quantize={cfg.quantize})", file=sys.stderr)
    return texts


if __name__ == "__main__":
    from llamalab.cli import stage_main

    stage_main(Config, main)
