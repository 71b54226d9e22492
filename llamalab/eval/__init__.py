"""Evaluation: benchmark tasks as data, log-likelihood and generative scoring, a code sandbox,
checkpoint sweeps and memorization analysis of a run, and an lm-evaluation-harness adapter.

Commands: ``llamalab eval run|sweep|memorization|harness`` (:mod:`llamalab.commands.eval`); this
package is their library (generation goes through :class:`llamalab.inference.engine.Engine`).
Guide: docs/eval.md.
"""
