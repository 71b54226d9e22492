"""Serve a model over an OpenAI-compatible HTTP API, with a web chat page: ``llamalab serve MODEL``.

The server itself (endpoints, engine thread, request validation, graceful shutdown) is
:mod:`llamalab.serve.api`, its Host/Origin/size checks :mod:`llamalab.serve.guard`; this command
loads the model with :func:`llamalab.model.folder.load` (through ``Engine.from_folder``), builds the
app and runs it under uvicorn (the ``serve`` extra). docs/security.md says how to expose it.
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
    chat_template: str = field(default="", metadata={
        "help": f"override the model's template: {', '.join(TEMPLATES)} (default: the folder's, else the "
                f"imported GGUF/HF template, else llama2)"})
    slots: int = field(default=8, metadata={"help": "requests decoded together in one batch"})
    max_seq_len: int = field(default=0, metadata={
        "help": "cap the context (and the KV cache) at this many tokens (0: the model's own)"})
    quantize: str = field(default="none", metadata={"choices": list(QUANT_CHOICES)})
    compile: bool = False
    allowed_hosts: str = field(default="", metadata={
        "help": "comma-separated Host names (name or name:port) accepted besides the bound address; * = any"})
    allowed_origins: str = field(default="", metadata={
        "help": "comma-separated browser origins (http://app.example:3000) allowed besides the server's own; * = any"})
    max_body_bytes: int = field(default=8 << 20, metadata={"help": "larger request bodies get 413"})
    max_prompt_chars: int = field(default=0, metadata={
        "help": "characters of prompt/messages per request, checked before tokenising (0: 32 x the context)"})
    max_messages: int = field(default=512, metadata={"help": "messages per chat request"})
    drain_seconds: float = field(default=10.0, metadata={
        "help": "on SIGTERM/SIGINT, let in-flight requests run this long, then abort them"})

    def validate(self) -> None:
        if not self.model:
            raise LlamalabError("serve needs a MODEL (model folder, run folder, HF folder or .gguf file)")
        if not 0 < self.port < 65536:
            raise LlamalabError(f"port must be in 1..65535, got {self.port}")
        if self.max_seq_len < 0:
            raise LlamalabError(f"max_seq_len must be >= 0 (0 = the model's), got {self.max_seq_len}")
        for name in ("max_body_bytes", "max_messages"):
            if getattr(self, name) < 1:
                raise LlamalabError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_prompt_chars < 0:
            raise LlamalabError(f"max_prompt_chars must be >= 0 (0 = 32 x the context), got {self.max_prompt_chars}")
        if not 0 <= self.drain_seconds <= 3600:
            raise LlamalabError(f"drain_seconds must be in [0, 3600], got {self.drain_seconds}")


def main(cfg: Config) -> None:
    from llamalab.inference.engine import Engine
    from llamalab.serve.api import ServeOptions, build_server, run_server

    engine = Engine.from_folder(cfg.model, slots=cfg.slots, quantize=cfg.quantize, compile=cfg.compile,
                                max_seq_len=cfg.max_seq_len or None)
    name = cfg.model_name or Path(cfg.model).resolve().name
    opts = ServeOptions(api_key=cfg.api_key or os.environ.get("LLAMALAB_API_KEY", ""), host=cfg.host, port=cfg.port,
                        allowed_hosts=tuple(h.strip() for h in cfg.allowed_hosts.split(",") if h.strip()),
                        allowed_origins=tuple(o.strip() for o in cfg.allowed_origins.split(",") if o.strip()),
                        max_body_bytes=cfg.max_body_bytes, max_prompt_chars=cfg.max_prompt_chars,
                        max_messages=cfg.max_messages)
    server = build_server(engine, name, cfg.chat_template or None, options=opts)
    print0(f"serve: {name} ({engine.cfg.dim}d x {engine.cfg.n_layers} layers, context {engine.max_seq_len}, "
           f"template {server.template}, {cfg.slots} slots, quantize={cfg.quantize}) on http://{cfg.host}:{cfg.port}/"
           f"{'' if opts.api_key else ' (no API key)'}")
    try:
        run_server(server, cfg.host, cfg.port, cfg.drain_seconds)
    finally:
        s = engine.stats
        print0(f"serve: {s['requests']} requests, {s['prompt_tokens']} prompt tokens, "
               f"{s['generated_tokens']} tokens generated, {s['aborted']} aborted, {s['failed']} failed")


if __name__ == "__main__":
    from llamalab.cli import stage_main

    stage_main(Config, main)
