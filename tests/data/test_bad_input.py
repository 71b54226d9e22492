"""Hostile bytes through the real commands (``llamalab data shard | clean | stats``): each case is a
one-line error naming the file (and line) under ``--on-error raise``, and a counted drop with its
reason under ``--on-error skip``; never a traceback. ``data shard`` records what it skipped in
``manifest.json``."""

import gzip
import json
import shutil
import sys
from pathlib import Path

import pytest

from llamalab.cli import main as cli
from llamalab.data.readers import ReadStats, binary_reason, read_documents

GOOD = [json.dumps({"text": t}) for t in ("A perfectly ordinary line of text, long enough to keep.",
                                           "Rain fell on the harbour all night while the boats slept.",
                                           "Seven quiet students read their books beside the window.")]
OTHER = json.dumps({"text": "The old clock in the hall struck twelve before anyone noticed."})


def _jsonl(lines: list[str]) -> bytes:
    return ("\n".join(lines) + "\n").encode()


def _case(root: Path, name: str) -> Path:
    """A folder holding one bad file (and a good file beside it, which must survive)."""
    d = root / name
    d.mkdir(parents=True)
    (d / "good.jsonl").write_bytes(_jsonl(GOOD))
    if name == "surrogate":  # parses as str, but no UTF-8 encoder accepts it
        (d / "bad.jsonl").write_bytes(_jsonl([OTHER, '{"text": "half an emoji \\ud83d here"}']))
    elif name == "surrogate_in_id":
        (d / "bad.jsonl").write_bytes(_jsonl([OTHER, '{"id": "x\\udc00", "text": "fine text"}']))
    elif name == "huge_int":
        (d / "bad.jsonl").write_bytes(_jsonl([OTHER, '{"text": "x", "n": 1' + "0" * 5000 + "}"]))
    elif name == "deep_nesting":
        (d / "bad.jsonl").write_bytes(_jsonl([OTHER, '{"text": "x", "n": ' + "[" * 100_000 + "]" * 100_000 + "}"]))
    elif name == "truncated_gz":
        data = gzip.compress(_jsonl([OTHER] * 600))
        (d / "bad.jsonl.gz").write_bytes(data[: len(data) // 2])
    elif name == "not_gzip":
        (d / "bad.txt.gz").write_bytes(b"plain bytes wearing a .gz suffix\n")
    elif name == "truncated_zst":
        zstandard = pytest.importorskip("zstandard")
        data = zstandard.ZstdCompressor().compress(_jsonl([OTHER] * 600))
        (d / "bad.jsonl.zst").write_bytes(data[: len(data) // 2])
    elif name == "nul_file":
        (d / "bad.txt").write_bytes(b"\0" * 4096)  # valid UTF-8, yet not text
    elif name == "executable":
        shutil.copy(sys.executable, d / "bad.txt")
    return d


# reason in the ledger / manifest, and what the one-line error must say
CASES = {
    "surrogate": ("lone_surrogate", "bad.jsonl:2: field 'text' holds a lone UTF-16 surrogate"),
    "surrogate_in_id": ("lone_surrogate", "bad.jsonl:2: field 'id' holds a lone UTF-16 surrogate"),
    "huge_int": ("malformed_json", "bad.jsonl:2: not valid JSON (Exceeds the limit (4300 digits)"),
    "deep_nesting": ("malformed_json", "bad.jsonl:2: not valid JSON (nested too deeply)"),
    "truncated_gz": ("truncated_file", "bad.jsonl.gz:"),
    "not_gzip": ("unreadable_file", "bad.txt.gz: not a readable gzip file"),
    "truncated_zst": ("truncated_file", "bad.jsonl.zst:"),
    "nul_file": ("binary", "bad.txt:1: binary data, not text (NUL byte at offset 0)"),
    "executable": ("binary", "bad.txt:1: binary data, not text"),
}


def _no_traceback(text: str) -> None:
    assert "Traceback" not in text and "Error:" not in text.replace("error:", ""), text


@pytest.mark.parametrize("case", list(CASES))
def test_shard_raise_is_one_line_and_skip_is_counted_in_manifest(case, tmp_path, capsys, botchan_tokenizer):
    reason, message = CASES[case]
    d = _case(tmp_path, case)
    tok = str(botchan_tokenizer.path)
    assert cli(["data", "shard", str(d), "--tokenizer", tok, "--output", str(tmp_path / "raise")]) == 2
    err = capsys.readouterr().err
    _no_traceback(err)
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    if case.startswith("truncated"):
        assert "truncated" in err and "ends before its data does" in err

    assert cli(["data", "shard", str(d), "--tokenizer", tok, "--output", str(tmp_path / "skip"),
                "--on-error", "skip"]) == 0
    out = capsys.readouterr()
    _no_traceback(out.err)
    assert f"skipped input: {reason}: 1" in out.out
    manifest = json.loads((tmp_path / "skip" / "manifest.json").read_text())
    skipped = manifest["skipped_input"]
    assert skipped["reasons"] == {reason: 1}
    assert len(skipped["examples"]) == 1 and skipped["examples"][0].endswith(f": {reason}")
    assert "bad." in skipped["examples"][0]
    ids = {doc["id"] for s in manifest["shards"] for doc in s["documents"]}
    # the good file survives whole; a damaged file keeps the documents read before the damage
    assert sum(i.startswith(f"{case}/good.jsonl") for i in ids) == 3


@pytest.mark.parametrize("case", list(CASES))
def test_clean_raise_is_one_line_and_skip_is_in_the_ledger(case, tmp_path, capsys):
    reason, message = CASES[case]
    d = _case(tmp_path, case)
    assert cli(["data", "clean", "--inputs", str(d), "--output", str(tmp_path / "raise")]) == 2
    err = capsys.readouterr().err
    _no_traceback(err)
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err

    assert cli(["data", "clean", "--inputs", str(d), "--output", str(tmp_path / "skip"), "--on-error", "skip"]) == 0
    out = capsys.readouterr()
    _no_traceback(out.err)
    stats = json.loads((tmp_path / "skip" / "stats.json").read_text())
    assert {"stage": "read", "reason": reason, "count": 1} in stats["documents_dropped"]
    assert stats["read"] == stats["kept"] + stats["dropped"]
    kept = [json.loads(line) for f in sorted((tmp_path / "skip" / "docs").rglob("*.jsonl"))
            for line in f.read_text().splitlines()]
    assert sum(r["provenance"].startswith(str(d / "good.jsonl")) for r in kept) == 3
    assert all("\ud83d" not in r["text"] for r in kept)


def test_stats_counts_bad_input(tmp_path, capsys):
    d = _case(tmp_path, "surrogate")
    shutil.copy(_case(tmp_path, "nul_file") / "bad.txt", d / "zeros.txt")
    assert cli(["data", "stats", str(d), "--on-error", "skip"]) == 0
    out = capsys.readouterr().out
    assert "lone_surrogate: 1" in out and "binary: 1" in out


def test_binary_detection_and_text_that_is_not_binary():
    assert binary_reason(b"\x7fELF\x02\x01\x01\x00") == "NUL byte at offset 7"
    assert "control characters" in binary_reason(bytes(range(1, 32)) * 10)
    assert binary_reason("Tabs\tand\r\nnewlines, é, 日本語 \x0c form feeds".encode()) is None
    assert binary_reason(b"") is None


def test_valid_surrogate_pairs_and_escaped_backslashes_are_text(tmp_path):
    f = tmp_path / "ok.jsonl"
    # a real pair (an emoji) and a literal backslash-u that only looks like an escape
    f.write_bytes(b'{"text": "smile \\ud83d\\ude00"}\n{"text": "C:\\\\ud800 is a path"}\n')
    docs = list(read_documents([f]))
    assert [d.text for d in docs] == ["smile \U0001F600", "C:\\ud800 is a path"]


def test_paragraphs_and_lines_modes_stream_with_the_same_documents(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("first para\nline two\n\n\nsecond para\n\nthird\n", encoding="utf-8")
    paras = list(read_documents([f], text_mode="paragraphs"))
    assert [(d.text, d.provenance) for d in paras] == [("first para\nline two", f"{f}:1"),
                                                       ("second para", f"{f}:5"), ("third", f"{f}:7")]
    lines = list(read_documents([f], text_mode="lines"))
    assert [d.id for d in lines] == [f"{tmp_path.name}/t.txt:{n}" for n in (1, 2, 5, 7)]


def test_max_doc_bytes_drops_too_long_documents_without_reading_them_whole(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "a.jsonl").write_text("\n".join([json.dumps({"text": "short"}), json.dumps({"text": "x" * 5000}),
                                          json.dumps({"text": "also short"})]) + "\n")
    (d / "big.txt").write_text("y" * 5000)
    (d / "p.txt").write_text("ok para\n\n" + "z" * 3000 + "\n" + "w" * 3000 + "\n\nlast para\n")
    stats = ReadStats()
    docs = list(read_documents([d], max_doc_bytes=4000, stats=stats))
    assert [x.text for x in docs] == ["short", "also short"]
    assert stats.errors == {"too_long": 3}  # the JSON line, big.txt, and p.txt as one document
    assert sorted(e.rsplit("/", 1)[1] for e in stats.error_examples) == ["a.jsonl:2: too_long", "big.txt:1: too_long",
                                                                         "p.txt:1: too_long"]
    stats = ReadStats()
    paras = list(read_documents([d / "p.txt"], text_mode="paragraphs", max_doc_bytes=4000, stats=stats))
    assert [x.text for x in paras] == ["ok para", "last para"] and stats.errors == {"too_long": 1}
    # too_long is a size rule, not bad input: on_error=raise does not stop on it
    assert len(list(read_documents([d / "a.jsonl"], on_error="raise", max_doc_bytes=4000))) == 2


def test_a_run_begun_before_a_new_setting_still_resumes(tmp_path, capsys):
    d = _case(tmp_path, "plain")
    out = tmp_path / "out"
    assert cli(["data", "clean", "--inputs", str(d), "--output", str(out)]) == 0
    plan = json.loads((out / "plan.json").read_text())
    del plan["settings"]["max_doc_bytes"]  # as written by the version before the setting existed
    (out / "plan.json").write_text(json.dumps(plan))
    assert cli(["data", "clean", "--inputs", str(d), "--output", str(out)]) == 0
    assert cli(["data", "clean", "--inputs", str(d), "--output", str(out), "--max-doc-bytes", "10"]) == 2
    assert "holds a run with different sources or settings" in capsys.readouterr().err


def test_zstd_reads_every_frame_and_gzip_members(tmp_path):
    zstandard = pytest.importorskip("zstandard")
    c = zstandard.ZstdCompressor()
    (tmp_path / "two.jsonl.zst").write_bytes(c.compress(_jsonl(GOOD[:2])) + c.compress(_jsonl(GOOD[2:])))
    (tmp_path / "two.jsonl.gz").write_bytes(gzip.compress(_jsonl(GOOD[:1])) + gzip.compress(_jsonl(GOOD[1:])))
    texts = [json.loads(g)["text"] for g in GOOD]
    assert [d.text for d in read_documents([tmp_path / "two.jsonl.zst"])] == texts
    assert [d.text for d in read_documents([tmp_path / "two.jsonl.gz"])] == texts
