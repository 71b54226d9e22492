"""Evaluation: benchmark tasks as data, log-likelihood and generative scoring, a code sandbox,
checkpoint sweeps and memorization analysis of a run, and an lm-evaluation-harness adapter.

Entry points: ``llamalab eval run`` (:mod:`llamalab.eval.run`), ``llamalab eval sweep``
(:mod:`llamalab.eval.sweep`), ``llamalab eval memorization`` (:mod:`llamalab.eval.memorization`);
``python -m llamalab.eval.lm_eval_adapter`` for lm-eval. Guide: docs/eval.md.
"""
