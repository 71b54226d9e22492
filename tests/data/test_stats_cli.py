"""``llamalab data clean | mix | stats`` through the real CLI table."""

import json

from llamalab.cli import main as cli
from tests.data.conftest import jsonl_rows


def test_clean_mix_stats_through_cli(tmp_path, capsys, botchan_paragraphs):
    src = tmp_path / "in" / "notes"
    src.mkdir(parents=True)
    with open(src / "a.jsonl", "w") as f:
        f.writelines(json.dumps({"id": str(i), "text": p}) + "\n" for i, p in enumerate(botchan_paragraphs[:30]))
        f.write(json.dumps({"id": "dup", "text": botchan_paragraphs[0]}) + "\n")
    out = tmp_path / "clean"
    assert cli(["data", "clean", "--inputs", str(src), "--kind", "text", "--source-name", "notes",
                "--output", str(out), "--keep-rejects"]) == 0
    text = capsys.readouterr().out
    assert "dedup          exact" in text and "read 31 documents" in text and "kept 30" in text
    rejects = jsonl_rows(out / "rejects" / "dedup.jsonl")
    assert [(r["id"], r["reason"]) for r in rejects] == [("notes/dup", "exact")]

    assert cli(["data", "stats", str(out)]) == 0
    text = capsys.readouterr().out
    assert "notes" in text and "stats: 30 documents" in text

    assert cli(["data", "mix", str(out), "--weights", '{"notes": 1.0}', "--output", str(tmp_path / "mix")]) == 0
    rows = jsonl_rows(tmp_path / "mix" / "mixed.jsonl")
    assert sorted(r["id"] for r in rows) == sorted(f"notes/{i}" for i in range(30))


def test_cli_bad_input_is_one_line_error(tmp_path, capsys):
    d = tmp_path / "in"
    d.mkdir()
    (d / "x.jsonl").write_text('{"text": "fine"}\n{"text": 3}\n')
    assert cli(["data", "clean", "--inputs", str(d), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "x.jsonl:2: no string field 'text'" in err and "Traceback" not in err
    assert cli(["data", "mix", str(tmp_path / "o"), "--preset", "llama"]) == 2
    assert "without docs/: the clean run did not finish" in capsys.readouterr().err
