"""llamalab: build LLaMA-family language models end to end, in the open."""

__version__ = "0.1.0"
