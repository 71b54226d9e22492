"""End to end: two tiny models answer MT-bench questions in-process (both turns), a real ``llamalab serve``
subprocess on a tiny model is the judge; then the same command resumes without asking anything again."""

from __future__ import annotations

import json

import pytest

from llamalab.common import LlamalabError
from llamalab.eval import judge as J
from tests.conftest import shared_path
from tests.inference.conftest import llama_tok_path  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, llama_tok_path):  # noqa: F811
    from llamalab.model.folder import save_model
    from tests.inference.conftest import small_model

    root = tmp_path_factory.mktemp("judge_models")
    out = {}
    for name, seed, ctx in (("alpha", 1, 512), ("beta", 2, 512), ("judge", 3, 4096)):
        save_model(root / name, small_model(seed=seed, max_seq_len=ctx), tokenizer_path=llama_tok_path,
                   extra={"chat_template": "llama2"})
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def served_judge(tiny_models):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from tests.serve.conftest import ServeProcess

    s = ServeProcess(tiny_models["judge"], "--slots", "4", name="tiny-judge")
    yield s
    s.stop()


def _cfg(tmp_path, tiny_models, url, **kw):
    from llamalab.commands.judge import Config

    cfg = Config(base_url=url + "/v1", model="tiny-judge", questions=str(shared_path("judge/mt_bench_question.jsonl")),
                 references=str(shared_path("judge/mt_bench_reference_answer_gpt-4.jsonl")), limit=kw.pop("limit", 3),
                 models=[f"alpha={tiny_models['alpha']}", f"beta={tiny_models['beta']}@temperature=0"],
                 out=str(tmp_path / "out"), max_tokens=8, judge_max_tokens=12, slots=4, bootstrap=20, mode="both",
                 **kw)
    cfg.validate()
    return cfg


def test_judge_end_to_end_against_llamalab_serve(tmp_path, tiny_models, served_judge):
    from llamalab.commands.judge import main

    cfg = _cfg(tmp_path, tiny_models, served_judge.url)
    r = main(cfg)
    out = tmp_path / "out"
    for m in ("alpha", "beta"):
        rows = [json.loads(x) for x in (out / "answers" / f"{m}.jsonl").read_text().splitlines()]
        assert [x["question_id"] for x in rows] == [81, 82, 83]
        assert all(len(x["turns"]) == 2 and x["model"] == m for x in rows)  # MT-bench: both turns answered
    assert rows[0]["settings"]["temperature"] == 0.0  # beta's @temperature=0
    c = r["results"]["counts"]
    assert c["jobs"] == 3 * 2 * (2 + 2) and c["errors"] == 0  # 3 questions x 2 turns x (2 grades + 2 orders)
    recs = [json.loads(x) for x in (out / J.JUDGMENTS).read_text().splitlines()]
    assert len(recs) == c["jobs"] and all(x["error"] is None for x in recs)
    assert sum(x["kind"] == "pair" for x in recs) == 12
    row = r["results"]["pairwise"]["alpha vs beta"]
    assert row["win"] + row["tie"] + row["loss"] + row["unparsable"] == 6  # a random judge: mostly unparsable
    meta = json.loads((out / "meta.json").read_text())
    assert meta["judge"]["endpoint"].endswith("/v1") and meta["judge"]["model"] == "tiny-judge"
    assert len(meta["questions"]["sha256"]) == 64 and meta["questions"]["count"] == 3
    assert (out / "report.html").exists()

    # the same command again: answers and judgments are reused, nothing is sent
    r2 = main(_cfg(tmp_path, tiny_models, served_judge.url))
    c2 = r2["results"]["counts"]
    assert c2["already"] == c2["jobs"] and c2["sent"] == 0
    assert all(a["already"] == 3 and a["answered"] == 0 for a in r2["meta"]["answers"])

    # other answer settings into the same folder are refused, naming the file
    with pytest.raises(LlamalabError, match=r"alpha.jsonl: question 81 was answered with other settings"):
        main(_cfg(tmp_path, tiny_models, served_judge.url, temperature=0.3))


def test_reference_goes_into_math_prompts(tmp_path, tiny_models):
    """MT-bench questions 111-113 are math: their judge prompts carry the GPT-4 reference (answers only here)."""
    questions = J.load_questions(shared_path("judge/mt_bench_question.jsonl"))
    refs = J.load_references(shared_path("judge/mt_bench_reference_answer_gpt-4.jsonl"))
    J.attach_references(questions, refs)
    q = next(x for x in questions if x.category == "math")
    answers = {"a": {q.question_id: {"turns": ["1", "2"]}}, "b": {q.question_id: {"turns": ["3", "4"]}}}
    jobs, _ = J.build_jobs([q], answers, J.JudgeSettings(mode="both"), {})
    assert len(jobs) == 2 * (2 + 2)
    assert all(refs[q.question_id][0] in j.messages[1]["content"] for j in jobs)
    assert all(refs[q.question_id][1] in j.messages[1]["content"] for j in jobs if j.turn == 2)
