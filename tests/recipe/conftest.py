"""Fixtures for the recipe tests: the preference-tuning fixtures (tiny model with the Botchan tokenizer,
synthetic marker-word pairs) reused from tests/align/conftest.py."""

from tests.align.conftest import align_base, align_tok, one_thread, pref_file  # noqa: F401
