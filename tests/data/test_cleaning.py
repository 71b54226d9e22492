"""The whole ``llamalab data clean`` pipeline on a small crawl built from real text: every drop
has a reason, the ledger adds up, 2 processes give byte-identical output, a crash resumes."""

import json
import shutil
from pathlib import Path

import pytest

from llamalab.commands.data.clean import Config, main
from llamalab.common import LlamalabError
from llamalab.data.clean.pipeline import (
    CleanSettings,
    SourceSpec,
    fill_defaults,
    load_clean_config,
    run_clean,
)
from llamalab.data.ledger import Ledger
from tests.conftest import shared_path
from tests.data.conftest import jsonl_rows

NAV = "Subscribe to our newsletter for weekly updates."
FRENCH = ("Le chat dort sur le canapé depuis ce matin. Il ne veut pas sortir sous la pluie froide. "
          "Sa maîtresse lui prépare un bol de lait chaud. Puis elle lit un long livre près de la fenêtre. ") * 3


@pytest.fixture(scope="module")
def crawl(tmp_path_factory, botchan_paragraphs, wiki_texts):
    d = tmp_path_factory.mktemp("crawl")
    pages = [p for p in botchan_paragraphs if p.endswith(".")][:40]
    gsm = json.loads(shared_path("eval/gsm8k_100.jsonl").read_text().splitlines()[5])["prompt"]
    rows = []
    for i, p in enumerate(pages):
        rows.append({"id": f"p{i}", "text": f"Home | News | Contact\n{p}\n{NAV}\n"
                                            "We use cookies to improve your visit."})
    rows[5]["text"] = FRENCH
    rows[9]["text"] = "Lorem ipsum dolor sit amet. " + pages[9]
    (d / "web").mkdir()
    for k, name in enumerate(["a.jsonl", "b.jsonl"]):
        with open(d / "web" / name, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows[k * 20:(k + 1) * 20])
    (d / "ref").mkdir()
    (d / "ref" / "wiki.txt").write_text("\n\n".join(wiki_texts[:25]), encoding="utf-8")
    (d / "notes").mkdir()
    note = next(p for p in botchan_paragraphs if not p.endswith("."))  # not one of the web pages
    (d / "notes" / "n1.txt").write_text(note + "\n", encoding="utf-8")
    (d / "notes" / "n2.txt").write_text(note + "  \n", encoding="utf-8")  # exact duplicate
    (d / "notes" / "n3.txt").write_text(pages[13] + " " + gsm, encoding="utf-8")  # contaminated
    return d


def _run(crawl: Path, out: Path, workers: int = 1, executor: str = "local", **kw) -> Ledger:
    sources = [SourceSpec("web", "web", [str(crawl / "web")]), SourceSpec("notes", "text", [str(crawl / "notes")]),
               SourceSpec("arxiv", "arxiv", [str(shared_path("corpus/arxiv"))])]
    s = CleanSettings(reference=[str(crawl / "ref" / "wiki.txt")], calib_docs=40, min_reference_score=0.0,
                      eval_files=[str(shared_path("eval/gsm8k_100.jsonl"))], shard_docs=8, **kw)
    return run_clean(sources, s, out, workers=workers, executor=executor)


@pytest.fixture(scope="module")
def run1(crawl, tmp_path_factory):
    out = tmp_path_factory.mktemp("run1")
    return out, _run(crawl, out)


def _outputs(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted((out / "docs").rglob("*.jsonl"))}


def test_every_drop_has_a_reason_and_ledger_adds_up(run1):
    out, led = run1
    assert led.read == 40 + 3 + 3
    kept_rows = jsonl_rows(*(out / "docs").rglob("*.jsonl"))
    assert led.kept == len(kept_rows) and led.read == led.kept + led.dropped
    assert led.docs[("clean", "lang:fr")] == 1
    assert led.docs[("clean", "c4:lorem_ipsum")] == 1
    assert led.docs[("decontam", "gsm8k_100.jsonl")] == 1
    assert led.docs[("dedup", "exact")] == 1
    assert 8 <= led.docs[("clean", "perplexity:tail")] <= 16  # about a third of the pages
    # 38 pages carry 3 boilerplate lines; line dedup (before C4) keeps only the first copies,
    # which C4 then removes except the nav line (it ends with a full stop)
    assert led.lines[("clean", "line_dedup")] == 37 * 3
    assert led.lines[("clean", "c4:cookie")] == 1 and led.lines[("clean", "c4:no_terminal_punct")] == 1
    texts = "\n".join(r["text"] for r in kept_rows)
    assert texts.count(NAV) == 1 and "Home | News" not in texts and "cookies" not in texts
    assert all(r["meta"]["bucket"] in ("head", "middle") for r in kept_rows if r["source"] == "web")
    stats = json.loads((out / "stats.json").read_text())
    assert stats["read"] == led.read and stats["examples"]["clean/lang:fr"][0]["id"] == "web/p5"


def test_two_processes_byte_identical(run1, crawl, tmp_path):
    out1, led1 = run1
    led2 = _run(crawl, tmp_path / "run2", workers=2)
    assert _outputs(out1) == _outputs(tmp_path / "run2")
    assert led1.to_dict() == led2.to_dict()


def test_ray_executor_byte_identical(run1, crawl, tmp_path):
    """The Ray adapter (a local Ray cluster) writes the same bytes and ledger as the local executor."""
    pytest.importorskip("ray")
    out1, led1 = run1
    led2 = _run(crawl, tmp_path / "ray", executor="ray")
    assert _outputs(out1) == _outputs(tmp_path / "ray")
    assert led1.to_dict() == led2.to_dict()


def test_crash_resumes_without_redoing_finished_shards(run1, crawl, tmp_path):
    out1, _ = run1
    out = tmp_path / "resumed"
    shutil.copytree(out1, out)
    victim = "00002_web"
    (out / "stage1" / "_done" / f"{victim}.json").unlink()  # as if the run died inside this shard
    (out / "stage1" / f"{victim}.jsonl").unlink()
    shutil.rmtree(out / "dedup")
    before = {p.name: p.stat().st_mtime_ns for p in (out / "stage1").glob("*.jsonl")}
    _run(crawl, out)
    after = {p.name: p.stat().st_mtime_ns for p in (out / "stage1").glob("*.jsonl")}
    assert f"{victim}.jsonl" in after
    assert all(after[n] == t for n, t in before.items())  # finished shards untouched
    assert _outputs(out) == _outputs(out1)


def test_decontam_flag_mode_keeps_and_marks(crawl, tmp_path):
    led = _run(crawl, tmp_path / "flag", decontam="flag", near_dup=False)
    assert led.flagged[("decontam", "gsm8k_100.jsonl")] == 1 and ("decontam", "gsm8k_100.jsonl") not in led.docs
    rows = jsonl_rows(*(tmp_path / "flag" / "docs").rglob("*.jsonl"))
    assert any(r.get("meta", {}).get("contaminated") == "gsm8k_100.jsonl" for r in rows)


def _bad_inputs(d: Path) -> Path:
    d.mkdir()
    good = json.dumps({"text": "A fine line of text that is long enough to keep."})
    (d / "a.jsonl").write_bytes((good + "\n{not json\n" + good + "\n").encode())
    (d / "b.jsonl").write_bytes(b'{"text": "caf\xe9 broken utf8"}\n' + (good + "\n").encode())
    (d / "c.jsonl").write_text(json.dumps({"body": "no text field"}) + "\n")
    (d / "empty.jsonl").write_text("")
    return d


def test_bad_input_raises_naming_file_and_line(tmp_path):
    d = _bad_inputs(tmp_path / "in")
    with pytest.raises(LlamalabError, match=r"a\.jsonl:2: not valid JSON"):
        main(Config(inputs=[str(d)], kind="text", output=str(tmp_path / "o1")))


def test_bad_input_skipped_and_counted(tmp_path, capsys):
    d = _bad_inputs(tmp_path / "in")
    stats = main(Config(inputs=[str(d)], kind="text", output=str(tmp_path / "o2"), on_error="skip",
                        exact_dedup=False, near_dup=False))
    rows = {(r["stage"], r["reason"]): r["count"] for r in stats["documents_dropped"]}
    assert rows == {("read", "malformed_json"): 1, ("read", "invalid_utf8"): 1, ("read", "missing_field:text"): 1}
    assert stats["kept"] == 3 and stats["read"] == 6
    out = capsys.readouterr().out
    assert "malformed_json" in out and "read 6 documents" in out


def test_config_file_and_errors(tmp_path, crawl):
    cfg = tmp_path / "clean.json"
    cfg.write_text(json.dumps({"sources": [{"name": "notes", "kind": "text", "inputs": [str(crawl / "notes")]}],
                               "near_dup": False}))
    stats = main(Config(spec=str(cfg), output=str(tmp_path / "o")))
    assert stats["read"] == 3 and stats["kept"] == 2
    cfg.write_text(json.dumps({"sources": [{"name": "x", "kind": "blog", "inputs": ["a"]}]}))
    with pytest.raises(LlamalabError, match=r"sources\[0\]: kind 'blog'"):
        main(Config(spec=str(cfg), output=str(tmp_path / "o3")))
    cfg.write_text(json.dumps({"sources": [], "colour": 1}))
    with pytest.raises(LlamalabError, match="unknown setting 'colour'"):
        main(Config(spec=str(cfg), output=str(tmp_path / "o4")))


def test_config_file_inputs_relative_to_it_and_flags_win(tmp_path):
    cfg = tmp_path / "cfg" / "clean.json"
    cfg.parent.mkdir()
    cfg.write_text(json.dumps({"sources": [{"name": "n", "kind": "text", "inputs": ["notes/", "/abs/x"]}],
                               "near_dup": False, "shard_docs": 7}))
    sources, values = load_clean_config(cfg)
    assert sources[0].inputs == [str(cfg.parent / "notes"), "/abs/x"]
    assert values == {"near_dup": False, "shard_docs": 7}
    target = Config(shard_docs=50)  # as if --shard-docs 50 was given
    fill_defaults(target, values, Config(), str(cfg))
    assert target.near_dup is False and target.shard_docs == 50
    assert CleanSettings.pick(target) == CleanSettings(near_dup=False, shard_docs=50)


def test_read_errors_counted_once_across_range_shards(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    good = [json.dumps({"text": f"Line number {i} of a file that is long enough."}) for i in range(7)]
    lines = [good[0], "{bad", good[1], good[2], "{bad", "\xff", good[3], good[4], good[5], good[6], "{bad"]
    (d / "x.jsonl").write_bytes("\n".join(lines).encode("utf-8").replace("\xff".encode(), b"\xff") + b"\n")
    led = run_clean([SourceSpec("t", "text", [str(d)])], CleanSettings(shard_docs=2, on_error="skip", near_dup=False),
                    tmp_path / "o")
    assert led.docs[("read", "malformed_json")] == 3 and led.docs[("read", "invalid_utf8")] == 1
    assert led.kept == 7 and led.read == 11


def test_resume_refuses_changed_settings(crawl, tmp_path):
    out = tmp_path / "o"
    spec = [SourceSpec("notes", "text", [str(crawl / "notes")])]
    run_clean(spec, CleanSettings(near_dup=False), out)
    run_clean(spec, CleanSettings(near_dup=False, keep_rejects=True), out)  # not an output setting
    with pytest.raises(LlamalabError, match="different sources or settings"):
        run_clean(spec, CleanSettings(near_dup=True), out)


def test_code_source_licence_and_exact_dedup(tmp_path):
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("abc.py", "bisect.py", "keyword.py"):
        shutil.copy(stdlib / name, repo / name)
    shutil.copy(stdlib / "bisect.py", repo / "bisect_copy.py")  # a vendored copy: exact duplicate
    (repo / "gpl.py").write_text("# SPDX-License-Identifier: GPL-2.0-only\nimport os\nprint(os.sep)\n")
    led = run_clean([SourceSpec("github", "code", [str(repo)])], CleanSettings(), tmp_path / "o", workers=2)
    assert led.read == 5 and led.kept == 3
    assert led.docs[("clean", "license:copyleft")] == 1 and led.docs[("dedup", "exact")] == 1
    assert led.lines[("clean", "code:boilerplate_header")] == 2  # abc.py's copyright lines
    rows = jsonl_rows(*(tmp_path / "o" / "docs" / "github").glob("*.jsonl"))
    assert sorted(r["id"].rsplit("/", 1)[-1] for r in rows) == ["abc.py", "bisect.py", "keyword.py"]
