import gzip
import json
import random

import pytest

from llamalab.common import LlamalabError
from llamalab.data.dedup import (
    Decontaminator,
    ExactDedup,
    NearDupIndex,
    eval_texts,
    line_hashes,
    normalize_line,
)
from tests.conftest import shared_path


def test_normalize_line():
    assert normalize_line("  Café   in 2024, OK?! ") == "cafe in 0000 ok"
    assert line_hashes("a b\n\n  A   B!\nc") [0] == line_hashes("a b\n\n  A   B!\nc")[1]


def test_exact_dedup_whitespace_insensitive():
    d = ExactDedup()
    assert d.check_and_add("a", "hello  world\n") is None
    assert d.check_and_add("b", "hello world") == "a"
    assert d.check_and_add("c", "hello world!") is None


def test_minhash_near_duplicate_and_distinct(botchan_paragraphs):
    docs = botchan_paragraphs[:50]
    idx = NearDupIndex(threshold=0.7)
    for i, d in enumerate(docs):
        assert idx.check_and_add(f"d{i}", d) is None, f"distinct paragraph {i} flagged as a duplicate"
    words = docs[7].split()
    rng = random.Random(1)
    for i in rng.sample(range(len(words)), 3):
        words[i] = "xyzzy"
    hit = idx.check_and_add("edited", " ".join(words))
    assert hit is not None and hit[0] == "d7"
    with pytest.raises(LlamalabError, match="threshold"):
        NearDupIndex(threshold=1.5)


def test_decontamination_catches_planted_item(tmp_path, botchan_paragraphs):
    gsm = shared_path("eval/gsm8k_100.jsonl")
    items = eval_texts(gsm)
    assert len(items) == 100
    dc = Decontaminator.from_files([gsm], n=13)
    planted = botchan_paragraphs[2] + " " + json.loads(gsm.read_text().splitlines()[17])["prompt"] + " The end."
    assert dc.match(planted) == "gsm8k_100.jsonl"
    assert all(dc.match(p) is None for p in botchan_paragraphs[:100])
    # gzipped JSONL eval files are read too
    z = tmp_path / "mine.jsonl.gz"
    with gzip.open(z, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"question": botchan_paragraphs[4]}) + "\n")
    dc2 = Decontaminator.from_files([z], n=13)
    assert dc2.match("prefix words " + botchan_paragraphs[4][:200]) == "mine.jsonl.gz"
