"""Serve a model over an OpenAI-compatible HTTP API, with a web chat page: ``llamalab serve MODEL``.

The server itself (endpoints, engine thread, request validation) is :mod:`llamalab.serve.api`;
this command loads the model with :func:`llamalab.model.folder.load` (through
``Engine.from_folder``), builds the app and runs it under uvicorn (the ``serve`` extra).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from llamalab.common import LlamalabError, print0
from llamalab.inference.quantize import QUANT_CHOICES
from llamalab.tokenizer.templates import TEMPLATES


@dataclass
class Config:
    model: str = field(default="", metadata={"positional": True,
                                                  "help": "model or run folder, HF LLaMA folder or .gguf file"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to bind (0.0.0.0 exposes it to the network)"})
    port: int = 8000
    model_name: str = field(default="", metadata={"help": "the id clients use (default: the folder name)"})
    api_key: str = field(default="", metadata={"help": "require 'Authorization: Bearer KEY' (or env LLAMALAB_API_KEY)"})
    chat_template: str = field(default="", metadata={"help": f"override the folder's template: {', '.join(TEMPLATES)}"})
    slots: int = field(default=8, metadata={"help": "requests decoded together in one batch"})
    quantize: str = field(default="none", metadata={"choices": list(QUANT_CHOICES)})
    compile: bool = False

    def validate(self) -> None:
        if not self.model:
            raise LlamalabError("serve needs a MODEL (model folder, run folder, HF folder or .gguf file)")
        if not 0 < self.port < 65536:
            raise LlamalabError(f"port must be in 1..65535, got {self.port}")


def main(cfg: Config) -> None:
    import uvicorn

    from llamalab.inference.engine import Engine
    from llamalab.serve.api import build_server

    engine = Engine.from_folder(cfg.model, slots=cfg.slots, quantize=cfg.quantize, compile=cfg.compile)
    name = cfg.model_name or Path(cfg.model).resolve().name
    api_key = cfg.api_key or os.environ.get("LLAMALAB_API_KEY", "")
    server = build_server(engine, name, cfg.chat_template or None, api_key)
    app = server.app()
    print0(f"serve: {name} ({engine.cfg.dim}d x {engine.cfg.n_layers} layers, context {engine.max_seq_len}, "
           f"template {server.template}, {cfg.slots} slots, quantize={cfg.quantize}) on http://{cfg.host}:{cfg.port}/")
    try:
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning")
    finally:
        server.aengine.close()
        s = engine.stats
        print0(f"serve: {s['requests']} requests, {s['prompt_tokens']} prompt tokens, "
               f"{s['generated_tokens']} tokens generated")


if __name__ == "__main__":
    from llamalab.cli import stage_main

    stage_main(Config, main)
