"""Decontamination at the granularity that matched: one MMLU item quoting Hamlet costs the corpus
Polonius' speech, not the plays. Real text: two Shakespeare plays from the shared corpus and a real
slice of MMLU (1,000 items, one of which quotes Hamlet), through ``llamalab data clean``."""

import gzip
import json

import pytest

from llamalab.cli import main as cli
from llamalab.data.dedup import Decontaminator, units
from tests.conftest import shared_path
from tests.data.conftest import jsonl_rows

NGRAM = "your noble son is mad mad call i it for to define true"


@pytest.fixture(scope="module")
def plays_and_mmlu(tmp_path_factory):
    d = tmp_path_factory.mktemp("shakespeare")
    with gzip.open(shared_path("corpus/shakespeare/shakespeare.txt.gz"), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    rows = {r.split("\t")[0]: r.split("\t") for r in
            shared_path("corpus/shakespeare/index.tsv").read_text().splitlines()[1:]}
    plays = []
    for play in ("hamlet_gut", "julius_caesar_gut"):
        start, n = int(rows[play][3]), int(rows[play][4])
        plays.append("\n".join(lines[start - 1:start - 1 + n]))
    (d / "books").mkdir()
    text = "\n\n".join(plays) + "\n"
    (d / "books" / "plays.txt").write_text(text, encoding="utf-8")
    with gzip.open(shared_path("eval/mmlu.jsonl.gz"), "rt", encoding="utf-8") as f:
        mmlu = f.read().split("\n")[8000:9000]  # real items; file line 8500 is the Hamlet one
    (d / "mmlu_part.jsonl").write_text("\n".join(mmlu) + "\n", encoding="utf-8")
    assert "Your noble son is mad" in mmlu[499]
    return d, text


def test_clean_removes_the_matching_speech_and_keeps_the_plays(plays_and_mmlu, tmp_path, capsys):
    d, text = plays_and_mmlu
    out = tmp_path / "clean"
    assert cli(["data", "clean", "--inputs", str(d / "books"), "--kind", "books", "--source-name", "books",
                "--eval-files", str(d / "mmlu_part.jsonl"), "--output", str(out), "--keep-rejects"]) == 0
    printed = capsys.readouterr().out
    assert "eval item mmlu_part.jsonl:500" in printed and NGRAM in printed
    stats = json.loads((out / "stats.json").read_text())
    assert stats["read"] == 1 and stats["kept"] == 1 and stats["dropped"] == 0
    # Polonius' speech: "Pol." and 11 lines of verse up to "But let that go."
    assert {"stage": "decontam", "reason": "mmlu_part.jsonl", "count": 12} in stats["lines_dropped"]
    [rec] = stats["decontaminated"]["records"]
    assert rec["id"] == "books/plays.txt" and rec["action"] == "removed"
    assert rec["eval"] == "mmlu_part.jsonl:500" and rec["ngram"] == NGRAM and rec["ngrams"] == 12
    [kept] = jsonl_rows(*(out / "docs").rglob("*.jsonl"))
    assert "your noble son is mad" not in kept["text"].lower()
    assert "To be, or not to be" in kept["text"] and "Friends, Romans, countrymen" in kept["text"]
    assert len(text) - len(kept["text"]) == rec["chars_removed"] == stats["bytes_read"] - stats["bytes_kept"]
    assert kept["meta"]["decontaminated"] == [{"eval": "mmlu_part.jsonl:500", "ngram": NGRAM,
                                                "chars_removed": rec["chars_removed"]}]
    [reject] = jsonl_rows(out / "rejects" / "00000_books.jsonl")
    assert reject["stage"] == "decontam" and reject["eval"] == "mmlu_part.jsonl:500"
    assert reject["text"].startswith("Pol.\nThis business is well ended.") and "But let that go." in reject["text"]
    # the old whole-document mode is still there, by name
    assert cli(["data", "clean", "--inputs", str(d / "books"), "--kind", "books", "--decontam", "drop",
                "--eval-files", str(d / "mmlu_part.jsonl"), "--output", str(tmp_path / "drop")]) == 0
    stats = json.loads((tmp_path / "drop" / "stats.json").read_text())
    assert stats["kept"] == 0 and {"stage": "decontam", "reason": "mmlu_part.jsonl", "count": 1} in \
        stats["documents_dropped"]


def test_flag_mode_names_the_item(plays_and_mmlu, tmp_path):
    d, _ = plays_and_mmlu
    out = tmp_path / "flag"
    assert cli(["data", "clean", "--inputs", str(d / "books"), "--kind", "books", "--decontam", "flag",
                "--eval-files", str(d / "mmlu_part.jsonl"), "--output", str(out)]) == 0
    [kept] = jsonl_rows(*(out / "docs").rglob("*.jsonl"))
    assert "your noble son is mad" in kept["text"].lower()
    assert kept["meta"]["contaminated"] == "mmlu_part.jsonl"
    assert kept["meta"]["contamination"] == [{"eval": "mmlu_part.jsonl:500", "ngram": NGRAM}]


def test_remove_spans_units_and_merges_neighbours(botchan_paragraphs):
    item = " ".join(botchan_paragraphs[3].split()[:40])
    dc = Decontaminator(13)
    dc.add("ev.jsonl", [item], ["ev.jsonl:7"])
    paras = botchan_paragraphs[:6]
    text = "\n\n".join(paras)
    out, recs = dc.remove(text)
    assert out == "\n\n".join(paras[:3] + paras[4:])
    assert [(r["eval"], r["ngrams"]) for r in recs] == [("ev.jsonl:7", 40 - 13 + 1)]
    assert recs[0]["ngram"] == " ".join(item.lower().replace(",", "").replace(".", "").split()[:13])
    # the last paragraph: the text is kept up to the previous one, without a dangling blank line
    dc.add("ev.jsonl", [" ".join(paras[5].split()[-20:])], ["ev.jsonl:9"])
    out, recs = dc.remove(text)
    assert out == "\n\n".join(paras[:3] + [paras[4]]) and [r["eval"] for r in recs] == ["ev.jsonl:7", "ev.jsonl:9"]
    # a single line longer than a unit loses only the pieces around the match
    line = " ".join(botchan_paragraphs[:40])
    out, recs = dc.remove(line)
    assert 0 < recs[0]["chars_removed"] < 5000 and len(out) == len(line) - sum(r["chars_removed"] for r in recs)
    assert len(units(line, 2000)) > 5
