"""Shared fixtures for the preference-tuning tests (data, DPO, reward model, PPO).

- ``one_thread`` (autouse, per module): torch on one thread while an align test module runs;
- ``align_tok``: the 1000-piece Botchan SentencePiece tokenizer (session-cached);
- ``align_base``: a randomly initialised tiny llamalab model folder with that tokenizer (128-token context,
  template llama2 by default);
- ``synthetic_pairs(n, seed)`` / ``pref_file``: the synthetic preference "answers containing the marker word are
  chosen": each prompt asks about a topic; both answers are the same few filler words, the chosen one with
  :data:`MARKER` inserted, the rejected one with another filler word at the same place. A model can only tell
  them apart by the marker, so a reward model should reach ~100% held-out accuracy and DPO should raise the
  chosen answers' log-prob ratio on held-out prompts.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

MARKER = "gentleman"  # a whole word in Botchan (a handful of pieces in the 1000-piece tokenizer)
TOPICS = ["the school", "the town", "the river", "the teacher", "the boy", "the house", "the inn", "the sea",
          "the night", "the train", "the letter", "the money", "the fish", "the hill", "the bath", "the moon",
          "the rain", "the road", "the cat", "the dog", "the door", "the tree", "the book", "the food"]
FILLER = ["good", "bad", "old", "new", "big", "small", "quiet", "long", "red", "cold", "warm", "dark",
          "very", "quite", "much", "some", "many", "little", "great", "poor"]


def synthetic_pairs(n: int = 64, seed: int = 0, n_topics: int = 0) -> list[dict]:
    """``n`` records in the ``pairs`` format (prompt, chosen, rejected), deterministic in ``seed``.
    ``n_topics`` > 0 repeats that many distinct prompts (several pairs per prompt); 0: every prompt distinct."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        topic = TOPICS[i % n_topics] if n_topics else f"{TOPICS[i % len(TOPICS)]} number {i}"
        body = [rng.choice(FILLER) for _ in range(rng.randint(3, 5))]
        at = rng.randint(0, len(body))
        other = rng.choice(FILLER)
        chosen = " ".join(body[:at] + [MARKER] + body[at:])
        rejected = " ".join(body[:at] + [other] + body[at:])
        out.append({"prompt": f"Tell me about {topic}.", "chosen": chosen, "rejected": rejected})
    return out


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread (two threads on a busy 2-core machine can be 100x slower), and runs
    then do not depend on the thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def align_tok(botchan_tokenizer):
    return botchan_tokenizer


@pytest.fixture
def align_base(tmp_path, tiny_config, align_tok) -> Path:
    """A randomly initialised tiny model folder (vocab of the Botchan tokenizer, 128-token context)."""
    from llamalab.model import Transformer
    from llamalab.model.folder import save_model

    tiny_config.vocab_size = align_tok.vocab_size
    tiny_config.max_seq_len = 128
    torch.manual_seed(0)
    return save_model(tmp_path / "base", Transformer(tiny_config), align_tok.path)


@pytest.fixture
def pref_file(tmp_path) -> Path:
    """256 synthetic marker-word pairs (distinct prompts) as JSONL."""
    return write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(256, seed=0))
