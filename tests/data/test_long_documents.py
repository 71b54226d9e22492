"""One huge document must not cost memory out of proportion to its size: ``data shard`` tokenizes
it in pieces (ids equal to whole-document encoding), ``data clean`` hashes, shingles and matches
n-grams piece by piece. Peak RSS is measured in a subprocess, net of its imports."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from llamalab.data.dedup import Decontaminator, minhash, normalize_line, shingles, text_hash, units
from llamalab.data.filters import BAD_LINE_PATTERNS
from llamalab.data.shards import ShardWriterConfig, _encode_texts, _LongDocs, space_mode, split_for_encoding
from tests.conftest import ROOT, shared_path

MAX_BYTES_PER_BYTE = 12  # before: shard 41, clean 19 bytes of RAM per input byte

DRIVER = """
import resource, sys
import datasketch, sentencepiece, numpy
import llamalab.commands.data.clean, llamalab.commands.data.shard
from llamalab.cli import main
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
rc = main(sys.argv[1:])
print("RSS_KB", base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, rc)
"""


def _one_line(botchan_text: str, n_bytes: int) -> str:
    body = " ".join(botchan_text.split("*** START")[1].split("*** END")[0].split())
    return (body * (n_bytes // len(body) + 1))[:n_bytes]


def _net_peak(args: list[str]) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", DRIVER, *args], capture_output=True, text=True, env=env, timeout=300)
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("RSS_KB"))
    _, base, peak, rc = line.split()
    assert rc == "0", r.stdout[-2000:] + r.stderr[-2000:]
    return (int(peak) - int(base)) * 1024, r.stdout


@pytest.fixture(scope="module")
def long_line(tmp_path_factory, botchan_text):
    d = tmp_path_factory.mktemp("long")
    text = _one_line(botchan_text, 10_000_000)
    (d / "in").mkdir()
    (d / "in" / "one.txt").write_text(text, encoding="utf-8")
    return d, len(text)


def test_shard_memory_is_bounded_by_the_piece_not_the_document(long_line, botchan_tokenizer):
    d, n = long_line
    net, out = _net_peak(["data", "shard", str(d / "in"), "--tokenizer", str(botchan_tokenizer.path),
                          "--output", str(d / "shards"), "--val-fraction", "0"])
    assert net < MAX_BYTES_PER_BYTE * n, f"{net / n:.1f} bytes of RAM per input byte"
    manifest = json.loads((d / "shards" / "manifest.json").read_text())
    long_docs = manifest["long_documents"]
    assert long_docs["documents"] == 1 and long_docs["pieces"] > 30 and long_docs["inexact_cuts"] == 0
    print(f"shard: {net / n:.1f} bytes of RAM per input byte")


def test_clean_memory_is_bounded(long_line, tmp_path):
    d, n = long_line
    evalf = tmp_path / "eval.jsonl"
    evalf.write_text(json.dumps({"q": "nothing in this question appears anywhere in the novel botchan, ok"}) + "\n")
    net, out = _net_peak(["data", "clean", "--inputs", str(d / "in"), "--kind", "books", "--output",
                          str(tmp_path / "clean"), "--eval-files", str(evalf)])
    assert net < MAX_BYTES_PER_BYTE * n, f"{net / n:.1f} bytes of RAM per input byte"
    assert "kept 1" in out
    print(f"clean: {net / n:.1f} bytes of RAM per input byte")


@pytest.mark.parametrize("path", ["tok", "tokenizer/llama_spm/llama_tokenizer.model"])
def test_piecewise_ids_equal_whole_document_ids(path, botchan_tokenizer, botchan_text):
    from llamalab.tokenizer import Tokenizer

    tok = botchan_tokenizer if path == "tok" else Tokenizer(shared_path(path))
    assert space_mode(tok) == "drop"  # SentencePiece: the dummy prefix stands for the space at a cut
    texts = [botchan_text[:200_000], _one_line(botchan_text, 100_000), "a short one"]
    tally = _LongDocs()
    got = _encode_texts(tok, texts, ShardWriterConfig(piece_chars=3000, batch_chars=20_000), "drop", tally)
    for text, ids in zip(texts, got):
        assert np.array_equal(ids, tok.encode(text, bos=True, eos=True))
    assert tally.documents == 2 and tally.pieces > 90 and tally.inexact_cuts == 0


def test_text_without_spaces_is_cut_inexactly_and_counted():
    pieces, inexact = split_for_encoding("日本語の文章" * 2000, 1000, "drop")
    assert "".join(pieces) == "日本語の文章" * 2000 and inexact == len(pieces) - 1 > 5
    pieces, inexact = split_for_encoding("line one\n" * 500, 1000, "keep")
    assert "".join(pieces) == "line one\n" * 500 and inexact == 0


def test_streamed_normalisation_hashes_and_shingles_equal_whole_text(botchan_text):
    import hashlib
    import re

    from datasketch import MinHash

    text = botchan_text * 2  # over the piece size: the streamed paths run
    ws = text.split()
    assert normalize_line(text).split() == normalize_line(" ".join(ws)).split()
    assert text_hash(text) == hashlib.sha1(re.sub(r"\s+", " ", text).strip().encode()).hexdigest()
    ref = MinHash(num_perm=128, seed=1)
    ref.update_batch(list(shingles(text, 5)))
    assert (minhash(text).hashvalues == ref.hashvalues).all()
    spans = units(text, 2000)
    assert spans[0][0] == 0 and spans[-1][1] == len(text)
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:])) and max(b - a for a, b in spans) <= 4000


def test_match_streams_and_cookie_rule_is_linear(botchan_text):
    import time

    dc = Decontaminator(13)
    tail = "the quick brown fox jumps over the lazy dog while the cat watches it all"
    dc.add("mine.jsonl", [tail])
    assert dc.match(_one_line(botchan_text, 300_000) + " " + tail) == "mine.jsonl"
    line = "we use it. " * 20_000  # 220 KB: the backtracking regex needed seconds for this
    t = time.perf_counter()
    assert BAD_LINE_PATTERNS["cookie"].search(line) is False
    assert BAD_LINE_PATTERNS["cookie"].search(line + " cookies") is True
    assert time.perf_counter() - t < 0.5
