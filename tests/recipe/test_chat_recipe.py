"""``llamalab recipe chat``: the whole chain on a tiny model with tiny data slices, its record, and a rerun that
skips every step."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from llamalab.common import LlamalabError
from llamalab.config import from_dict
from llamalab.run_dir import RunDir
from tests.conftest import shared_path

STAGES = ("sft", "rm", "dpo", "ppo", "judge", "release")


def _write(path, records, array=False):
    text = json.dumps(records) if array else "".join(json.dumps(r) + "\n" for r in records)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def sft_files(tmp_path):
    alpaca = [{"instruction": f"Tell me about the school number {i}.", "input": "",
               "output": "It is a good old school."} for i in range(8)]
    share = [{"conversations": [{"from": "human", "value": f"Where is the river {i}?"},
                                {"from": "gpt", "value": "The river is near the town."}]} for i in range(8)]
    return [_write(tmp_path / "alpaca.json", alpaca, array=True), _write(tmp_path / "share.jsonl", share)]


@pytest.fixture
def counted(monkeypatch):
    """Count the calls of every stage's main (patched on its command module, where the recipe looks it up)."""
    import importlib

    calls: Counter = Counter()
    for name in (*STAGES, "eval.run"):
        mod = importlib.import_module(f"llamalab.commands.{name}")
        real = mod.main

        def wrapped(cfg, _real=real, _name=name):
            calls[_name] += 1
            return _real(cfg)

        monkeypatch.setattr(mod, "main", wrapped)
    return calls


def _config(tmp_path, base, sft_files, pref_file):
    from llamalab.commands.recipe_chat import Config

    small = {"limit": 0, "steps": 1, "batch_size": 4}
    return from_dict(Config, {
        "base": str(base), "out": str(tmp_path / "recipe"), "sft_data": [str(p) for p in sft_files],
        "preference_data": [str(pref_file)], "questions": str(shared_path("judge/vicuna80_question.jsonl")),
        "heldout_fraction": 0.25, "lora_rank": 4, "device": "auto",
        "sft": small, "rm": {**small, "limit": 32}, "dpo": {**small, "limit": 32},
        "ppo": {**small, "limit": 32, "overrides": json.dumps({"ppo": {"max_new_tokens": 8}})},
        "eval": {"tasks": ["arc_easy"], "paths": [str(shared_path("eval/arc/ARC-Easy-Dev.jsonl"))], "limit": 4,
                 "rm_prompts": 3, "max_new_tokens": 8, "judge_questions": 2, "bootstrap": 10},
        "release_gguf": False})


def test_chat_recipe_runs_every_step_then_a_rerun_skips_them(tmp_path, align_base, sft_files, pref_file, counted,
                                                           capsys):
    from llamalab.commands.recipe_chat import main

    cfg = _config(tmp_path, align_base, sft_files, pref_file)
    r = main(cfg)
    out = tmp_path / "recipe"
    # every training stage ran once (SFT once per file), the evaluation at 4 policies, the judge at 3
    assert counted["sft"] == 2 and counted["rm"] == counted["dpo"] == counted["ppo"] == 1
    assert counted["eval.run"] == 4 and counted["judge"] == 3 and counted["release"] == 1
    for folder in ("sft/1-alpaca", "sft/2-sharegpt", "rm", "dpo", "ppo"):
        assert (RunDir(out / folder).model / "config.json").is_file(), folder
    assert (out / "release").is_dir() and any((out / "release").iterdir())
    rec = json.loads(RunDir(out).recipe.read_text())
    steps = rec["steps"]
    assert {"start", "sft", "rm", "dpo", "ppo", "release"} <= set(steps)
    for name in ("sft", "rm", "dpo", "ppo", "release"):
        assert steps[name]["seconds"] > 0, name
    for name in ("start", "sft", "dpo", "ppo"):
        f = steps[name]["figures"]
        b = f["benchmarks"]["arc_easy"]
        assert b["n"] == 4 and 0 <= b["value"] <= 1 and b["stderr"] is not None
        assert f["rm_score"]["answered"] == 3 and f["rm_score"]["mean_rm_score"] is not None
    for name in ("sft", "dpo", "ppo"):
        j = steps[name]["figures"]["judge"]
        assert j["win"] + j["tie"] + j["loss"] + j["unparsable"] == 2
    items = (out / "eval_items" / "arc_easy.jsonl").read_text().splitlines()  # the same seeded sample every step
    assert len(items) == 4 and json.loads(items[0])["id"] != json.loads(
        shared_path("eval/arc/ARC-Easy-Dev.jsonl").read_text().splitlines()[0])["id"]
    assert all(steps[n]["figures"]["benchmarks"]["arc_easy"]["n"] == 4 for n in ("start", "sft", "dpo", "ppo"))
    assert "judge" not in steps["start"]["figures"]  # the start is not judged against itself
    cap = capsys.readouterr()
    assert (cap.out + cap.err).count("answers start ") == 1  # the start answered once (at sft), then read back
    assert not (out / "dpo" / "judge" / "answers" / "start.jsonl").exists()  # and not copied
    rm = steps["rm"]["figures"]["rm"]
    assert rm["pairs"] > 0 and 0 <= rm["accuracy"] <= 1
    # PPO trained on the prompts the RM and DPO did not hold out
    from llamalab.align.data import read_preferences, split_by_prompt

    pairs, _ = read_preferences([pref_file], "auto", 32)
    _, held = split_by_prompt(pairs, 0.25, cfg.seed)
    ppo_prompts = {json.dumps(json.loads(x)["messages"]) for x in (out / "ppo_prompts.jsonl").read_text().splitlines()}
    assert held and not ppo_prompts & {json.dumps(p.prompt) for p in held}
    html = RunDir(out).report.read_text()
    assert all(f"<td>{s}</td>" in html for s in ("start", "sft", "rm", "dpo", "ppo")) and "arc_easy" in html
    # the same table as Markdown, for a README: one row per step, the DPO row's train seconds and eval seconds
    md = RunDir(out).report.with_suffix(".md").read_text().splitlines()
    assert md[0].startswith("| step | arc_easy") and md[0].endswith("| train (s) | eval (s) |")
    dpo_row = next(r for r in md if r.startswith("| dpo |")).split(" | ")
    assert dpo_row[-2] == f"{steps['dpo']['seconds']:.0f}"
    assert dpo_row[-1].rstrip(" |") == f"{steps['dpo']['figures']['seconds']:.0f}"
    assert "&" not in "".join(md) and "±" in next(r for r in md if r.startswith("| sft |"))

    # the rerun: nothing trains or evaluates again, the record stays
    before = dict(counted)
    r2 = main(_config(tmp_path, align_base, sft_files, pref_file))
    assert dict(counted) == before and r2["ran"] == [] and r["ran"]
    rec2 = json.loads(RunDir(out).recipe.read_text())
    assert rec2["steps"]["dpo"]["figures"] == steps["dpo"]["figures"]
    assert rec2["steps"]["sft"]["seconds"] == steps["sft"]["seconds"]


def test_half_done_step_needs_resume(tmp_path, align_base, sft_files, pref_file):
    from llamalab.recipe.chat import Recipe, run_training_step

    folder = tmp_path / "r" / "rm"
    RunDir(folder).checkpoints.mkdir(parents=True)
    with pytest.raises(LlamalabError, match="half-done rm run.*--resume"):
        run_training_step(Recipe(tmp_path / "r", "b"), "rm", folder, (object, lambda c: None), {}, resume=False)


def test_sft_format_by_first_record_and_bad_input(tmp_path, sft_files):
    from llamalab.commands.recipe_chat import Config
    from llamalab.recipe.chat import sft_format

    assert [sft_format(p) for p in sft_files] == ["alpaca", "sharegpt"]
    with pytest.raises(LlamalabError, match=r"odd.jsonl:1: neither"):
        sft_format(_write(tmp_path / "odd.jsonl", [{"text": "x"}]))
    with pytest.raises(LlamalabError, match="--dpo.overrides: not JSON"):
        from_dict(Config, {"base": "b", "dpo": {"overrides": "{beta"}}).validate()
    with pytest.raises(LlamalabError, match="--eval.paths: 1 file.*2 task"):
        from_dict(Config, {"base": "b", "eval": {"tasks": ["arc_easy", "mmlu"], "paths": ["x"]}}).validate()


def test_flags_keep_the_step_defaults():
    from llamalab.commands.recipe_chat import Config
    from llamalab.config import parse_config

    cfg = parse_config(Config, ["--base", "b", "--ppo.limit", "3", "--eval.limit", "5", "--dpo.overrides",
                                '{"beta": 0.05}'])[0]
    cfg.validate()
    assert cfg.ppo.limit == 3 and cfg.ppo.steps == 10  # a short PPO round unless told otherwise
    assert cfg.eval.limit == 5 and len(cfg.eval.tasks) == len(cfg.eval.paths) == 5
    assert cfg.dpo.override_dict("dpo") == {"beta": 0.05}


def test_eval_subset_is_seeded_fixed_and_keeps_ids(tmp_path):
    from llamalab.recipe.chat import eval_subset

    src = _write(tmp_path / "t.jsonl", [{"q": i} for i in range(50)])
    a = eval_subset(src, 10, 1, tmp_path / "a.jsonl")
    recs = [json.loads(x) for x in a.read_text().splitlines()]
    assert len(recs) == 10 and recs != [{"q": i} for i in range(10)]  # a sample, not the head
    assert [r["q"] for r in recs] == sorted(r["q"] for r in recs)  # file order kept
    assert all(r["id"] == f"t.jsonl:{r['q'] + 1}" for r in recs)  # the id the reader gives it in the full file
    assert eval_subset(src, 10, 1, tmp_path / "b.jsonl").read_text() == a.read_text()  # same seed, same items
    src.write_text("")  # written once: a later call reads the sample back, never the source
    assert eval_subset(src, 10, 1, a) == a
    assert eval_subset(tmp_path / "a.jsonl", 0, 1, tmp_path / "c.jsonl") == tmp_path / "a.jsonl"  # 0: the whole file


def test_a_step_cut_off_stops_the_recipe_and_resume_finishes_it(tmp_path, align_base, sft_files, pref_file):
    from llamalab.commands.recipe_chat import main

    cfg = _config(tmp_path, align_base, sft_files, pref_file)
    cfg.eval.tasks, cfg.eval.paths, cfg.eval.rm_prompts, cfg.eval.judge_questions = [], [], 0, 0
    cfg.release = False
    cfg.dpo.steps, cfg.dpo.overrides = 2, json.dumps({"stop_after": 1, "checkpoint_interval": 1})
    with pytest.raises(LlamalabError, match="dpo stopped before writing.*--resume"):
        main(cfg)
    out = tmp_path / "recipe"
    assert RunDir(out / "dpo").list_checkpoints() and not (RunDir(out / "dpo").model / "config.json").exists()
    with pytest.raises(LlamalabError, match="half-done dpo run"):
        main(cfg)
    cfg.resume, cfg.dpo.overrides = True, ""
    r = main(cfg)
    assert r["ran"] == ["dpo", "ppo"]  # sft and rm were done; dpo resumed from its checkpoint
    steps = [json.loads(x)["step"] for x in RunDir(out / "dpo").metrics.read_text().splitlines()
             if "step" in json.loads(x)]
    assert max(steps) == 2
