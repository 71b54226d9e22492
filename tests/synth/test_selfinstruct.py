"""Self-Instruct: parsing of numbered triples, Alpaca's filters with reasons, the whole run against a scripted
endpoint (output loads as SFT data, resumes without repeated requests) and against a real ``llamalab serve``."""

from __future__ import annotations

import gzip
import json

import pytest

from llamalab.common import LlamalabError
from llamalab.synth.rouge import rouge_l
from llamalab.synth.selfinstruct import (
    LEDGER,
    REGEN,
    build_prompt,
    parse_tasks,
    read_seed_tasks,
    rule_filter,
)
from tests.conftest import shared_path
from tests.serve.conftest import long_folder  # noqa: F401 (fixture)

pytest.importorskip("httpx")


# ----------------------------------------------------------------------------- parsing

REPLY = """Sure! Here are new tasks:

1. Instruction: Give three tips for staying healthy.
1. Input:
<noinput>
1. Output:
Eat well, sleep enough and exercise.
###
2. Instruction: Translate the sentence into French.
2. Input:
The cat is on the table.
2. Output:
Le chat est sur la table.
###
3. Instruction: Classify the sentiment of the review. Input: I loved it. Output: Positive
###
4. **Instruction:** Summarize the paragraph in one sentence.
4. **Input:** Rain fell all day, so the match was cancelled and fans went home.
4. **Output:** The match was rained off.
###
5. Instruction: Name a prime number larger than 10.
5. Output:
11
###
6. Instruction: Write a haiku about autumn.
6. Input:
<noinput>
###
7. Instruction:
7. Input:
x
7. Output:
y
###
8. Instruction: List two colours.
8. Output: red, blue
8. Output: green
###
9. Instruction: Explain why the sky is blue.
9. Input:
<noinput>
9. Output:
Because of Rayleigh scatt"""


def test_parse_numbered_triples_and_malformed_blocks():
    tasks, bad = parse_tasks(REPLY, truncated=True)
    assert [(t.instruction, t.input, t.output) for t in tasks] == [
        ("Give three tips for staying healthy.", "", "Eat well, sleep enough and exercise."),
        ("Translate the sentence into French.", "The cat is on the table.", "Le chat est sur la table."),
        ("Classify the sentiment of the review.", "I loved it.", "Positive"),
        ("Summarize the paragraph in one sentence.",
         "Rain fell all day, so the match was cancelled and fans went home.", "The match was rained off."),
        ("Name a prime number larger than 10.", "", "11"),  # no Input field: an empty input
    ]
    assert [b.reason for b in bad] == ["no_output", "empty_instruction", "repeated_field", "truncated"]
    assert bad[0].text.startswith("6. Instruction: Write a haiku")
    # without the length cut the last block is a task
    tasks2, bad2 = parse_tasks(REPLY, truncated=False)
    assert tasks2[-1].output == "Because of Rayleigh scatt" and "truncated" not in [b.reason for b in bad2]


def test_parse_garbage_and_orphans():
    assert parse_tasks("I cannot help with that.") == ([], [parse_tasks("I cannot help with that.")[1][0]])
    assert parse_tasks("I cannot help with that.")[1][0].reason == "no_tasks"
    tasks, bad = parse_tasks("Input: a\nOutput: b\n###\n1. Instruction: Add two and three together.\n"
                             "1. Output: 5")
    assert [b.reason for b in bad] == ["no_instruction"] and tasks[0].output == "5"
    assert parse_tasks("") == ([], [])
    tasks, bad = parse_tasks("1. Instructions: Name three rivers in Europe.\n1. Outputs: Rhine, Danube, Seine")
    assert (tasks[0].instruction, tasks[0].output, bad) == ("Name three rivers in Europe.", "Rhine, Danube, Seine", [])


def test_prompt_shows_examples_in_the_reply_format():
    seeds = read_seed_tasks(shared_path("selfinstruct/seed_tasks.jsonl"))
    assert len(seeds) == 175
    p = build_prompt(seeds[:3], 5)
    assert "numbered 1 to 5" in p and "3. Instruction: " + seeds[2].instruction.rstrip(":") in p
    # the prompt's own examples parse back to the seed tasks (the format we ask for is the one we read)
    body = p.split("Here are some example tasks:", 1)[1]
    tasks, _ = parse_tasks(body.rsplit("Now write", 1)[0])
    assert [t.instruction for t in tasks] == [re_ws(s.instruction).rstrip(":") for s in seeds[:3]]


def re_ws(s: str) -> str:
    return " ".join(s.split())


def test_seed_file_errors(tmp_path):
    p = tmp_path / "s.jsonl"
    p.write_text('{"instruction": "Do a thing well.", "instances": [{"input": "", "output": "ok"}]}\n'
                 '{"instruction": "", "instances": []}\n')
    with pytest.raises(LlamalabError, match=r"s.jsonl:2: a seed task needs"):
        read_seed_tasks(p)
    p.write_text('{"instruction": "Do it.", "instances": "x"}\n')
    with pytest.raises(LlamalabError, match=r"s.jsonl:1: 'instances'"):
        read_seed_tasks(p)
    with pytest.raises(LlamalabError, match="not found"):
        read_seed_tasks(tmp_path / "none.jsonl")


# ----------------------------------------------------------------------------- filters


@pytest.mark.parametrize("instruction, reason, detail", [
    ("Do it now.", "too_short", "3 words (needs > 3)"),
    (" ".join(["word"] * 151), "too_long", "151 words (at most 150)"),
    ("Describe the picture of a sunset at the beach.", "banned_keyword", "picture"),
    ("Please go to the store and buy some milk.", "banned_keyword", "go to"),
    ("Summarize the contents of this FILE in two lines.", "banned_keyword", "file"),
    ("Write a program that prints the first ten primes.", "write_a_program", None),
    ("- List four kinds of citrus fruit.", "starts_with_punctuation", "-"),
    ("¿Cuál es la capital de Francia hoy?", "not_english", None),
    ("Traduis cette phrase en anglais, s'il te plaît, avec soin.", "not_english", None),
])
def test_rule_filter_reasons(instruction, reason, detail):
    got = rule_filter(instruction)
    assert got is not None and got[0] == reason
    if detail:
        assert got[1] == detail


def test_rule_filter_keeps_good_instructions():
    pytest.importorskip("py3langid")
    for ins in ["Give three tips for staying healthy.", "Explain the mapping between keys and values in Python.",
                "Converting 85 F to Celsius.", "What is the difference between weather and climate?"]:
        assert rule_filter(ins) is None, ins
    seeds = read_seed_tasks(shared_path("selfinstruct/seed_tasks.jsonl"))
    passed = [s for s in seeds if rule_filter(s.instruction) is None]
    assert len(passed) >= 150  # the human seed tasks mostly pass (some are short or name a file/graph)


# ----------------------------------------------------------------------------- the run, scripted endpoint


@pytest.fixture(scope="module")
def alpaca() -> list[dict]:
    with gzip.open(shared_path("sft/alpaca_5000.json.gz"), "rt", encoding="utf-8") as f:
        return json.load(f)


def _block(i: int, ins: str, inp: str, out: str | None) -> str:
    s = f"{i}. Instruction: {ins}\n{i}. Input:\n{inp or '<noinput>'}\n"
    return s + (f"{i}. Output:\n{out}\n" if out is not None else "")


def scripted(alpaca: list[dict], seeds: list) -> callable:
    """Replies keyed by the request's seed: 4 real Alpaca tasks, one banned, one near-copy of a seed, one malformed."""
    from tests.synth.conftest import echo_reply

    def script(body: dict, k: int):
        s = body["seed"] % 1000
        recs = alpaca[4 * s:4 * s + 4]
        blocks = [_block(i + 1, r["instruction"], r["input"], r["output"]) for i, r in enumerate(recs)]
        seed_ins = seeds[s % len(seeds)].instruction
        blocks.append(_block(5, "Draw a diagram of the water cycle for a school class.", "", "(a diagram)"))
        blocks.append(_block(6, seed_ins + " Please.", "", "An answer."))
        blocks.append(_block(7, "Give an example of a simile about the sea.", "", None))
        status, headers, out, _ = echo_reply({"messages": [{"content": ""}]})
        out["choices"][0]["message"]["content"] = "###\n".join(blocks)
        return status, headers, out, 0.0

    return script


def si_config(url: str, out, **kw):
    from llamalab.commands.selfinstruct import Config

    base = dict(base_url=url, model="fake", out=str(out), seeds=str(shared_path("selfinstruct/seed_tasks.jsonl")),
                num_instructions=10, batch_size=5, requests_per_round=2, max_tokens=512)
    return Config(**{**base, **kw})


def test_run_filters_with_reasons_and_writes_alpaca_data(fake_chat, alpaca, tmp_path, llama_tok):
    from llamalab.commands.selfinstruct import main
    from llamalab.finetune.data import load_sft_data

    seeds = read_seed_tasks(shared_path("selfinstruct/seed_tasks.jsonl"))
    f = fake_chat(scripted(alpaca, seeds))
    out = tmp_path / "si"
    meta = main(si_config(f.url, out, api_key="sk-not-stored"))
    kept = json.loads((out / REGEN).read_text())
    led = json.loads((out / LEDGER).read_text())
    assert len(kept) == 10 and meta["counts"]["kept"] == 10
    by = led["rejected_by_reason"]
    assert by["banned_keyword"] >= 1 and by["similar"] >= 1 and by["malformed:no_output"] >= 1
    # every candidate is accounted for: kept + rejected (with a reason) == candidates parsed
    assert led["candidates"] == len(kept) + led["rejected"] == len(kept) + len(led["rejections"])
    checked = [r for r in led["rejections"] if r["reason"] != "beyond_target"]  # once 10 are kept, the rest
    drawn = [r for r in checked if r.get("instruction", "").startswith("Draw a diagram")]
    assert drawn and all(r["reason"] == "banned_keyword" and r["detail"] == "draw" for r in drawn)
    near = [r for r in checked if r.get("instruction", "").endswith(" Please.")]
    assert near and all(r["reason"] == "similar" for r in near)
    for r in near:  # the similarity recorded is the true ROUGE-L with the instruction named
        assert r["rouge_l"] == rouge_l(r["instruction"], r["similar_to"]) >= 0.7
        assert r["instruction"] == r["similar_to"] + " Please."
    for k in kept:  # kept ones pass every rule and are below 0.7 against what came before
        assert rule_filter(k["instruction"]) is None and k["rouge_l"] < 0.7
    # it loads as `llamalab sft --format alpaca` data
    exs, ledger = load_sft_data([out / REGEN], "alpaca", "llama2", llama_tok, 512)
    assert ledger.kept == 10 and len(exs) >= 10
    m = json.loads((out / "meta.json").read_text())
    assert len(m["prompt_sha256"]) == 64 and len(m["seeds_sha256"]) == 64 and m["client"]["model"] == "fake"
    assert "sk-not-stored" not in (out / "meta.json").read_text() and m["filter"]["instructions_per_s"] > 0
    page = (out / "report.html").read_text()
    assert "banned_keyword" in page and "Candidates by outcome" in page
    # each request shows 3 seed examples, then 2 generated ones once any are kept
    prompts = [b["messages"][0]["content"] for b in f.bodies]
    assert prompts[0].count(". Instruction: ") == 3 and prompts[-1].count(". Instruction: ") == 5


def test_interrupted_run_resumes_without_repeated_requests(fake_chat, alpaca, tmp_path, monkeypatch):
    import llamalab.synth.selfinstruct as si
    from llamalab.commands.selfinstruct import main

    seeds = read_seed_tasks(shared_path("selfinstruct/seed_tasks.jsonl"))
    f = fake_chat(scripted(alpaca, seeds))
    out = tmp_path / "si"
    real = si.parse_tasks
    calls = {"n": 0}

    def crash_in_round_2(text, truncated=False):
        calls["n"] += 1
        if calls["n"] == 4:  # round 2's second reply: its requests were answered (and cached), nothing saved
            raise KeyboardInterrupt
        return real(text, truncated)

    monkeypatch.setattr(si, "parse_tasks", crash_in_round_2)
    with pytest.raises(KeyboardInterrupt):
        main(si_config(f.url, out, num_instructions=20))
    assert f.count == 4 and len(json.loads((out / REGEN).read_text())) > 0
    assert json.loads((out / "meta.json").read_text())["invocations"][0]["finished"] is None  # the crash shows
    with pytest.raises(LlamalabError, match="max_tokens"):  # other settings are refused even after a crash
        main(si_config(f.url, out, num_instructions=20, max_tokens=100))
    monkeypatch.setattr(si, "parse_tasks", real)
    meta = main(si_config(f.url, out, num_instructions=20))
    bodies = [json.dumps(b, sort_keys=True) for b in f.bodies]
    assert len(bodies) == len(set(bodies)), "a request was sent twice"
    assert meta["client_stats"]["cache_hits"] == 2 and meta["counts"]["kept"] == 20
    assert [h["finished"] is None for h in meta["invocations"]] == [True, False]
    # a finished run rerun sends nothing
    n = f.count
    main(si_config(f.url, out, num_instructions=20))
    assert f.count == n
    # different settings into the same folder are refused
    with pytest.raises(LlamalabError, match="batch_size"):
        main(si_config(f.url, out, num_instructions=20, batch_size=7))


def test_endpoint_down_is_reported_and_resumable(fake_chat, tmp_path, monkeypatch):
    from llamalab.commands.selfinstruct import main
    from llamalab.synth.client import ChatClient

    monkeypatch.setattr(ChatClient, "BACKOFF", 0.01)

    f = fake_chat(lambda body, k: (503, {}, {"error": {"message": "down"}}, 0))
    with pytest.raises(LlamalabError, match=r"every request of round 1 failed \(HTTP 503 after 2 tries: down\)"):
        main(si_config(f.url, tmp_path / "si", retries=1))
    led = json.loads((tmp_path / "si" / LEDGER).read_text())
    assert led["requests_failed"] == 2 and led["failed_requests"][0]["error"].startswith("HTTP 503")


def test_cli_flags(tmp_path):
    from llamalab.cli import invoke
    from llamalab.commands.selfinstruct import Config

    got = {}
    rc = invoke(Config, lambda c: got.setdefault("cfg", c), ["--base-url", "http://x/v1", "--out", str(tmp_path),
                                                             "--num-instructions", "7", "--concurrency", "2",
                                                             "--temperature", "0.7", "--seeds", "s.jsonl"], "t")
    assert rc == 0 and got["cfg"].num_instructions == 7 and got["cfg"].concurrency == 2
    assert invoke(Config, lambda c: None, ["--base-url", "http://x/v1"], "t") != 0  # no --out


# ----------------------------------------------------------------------------- against `llamalab serve`


@pytest.fixture(scope="module")
def live_long(long_folder):  # noqa: F811
    pytest.importorskip("fastapi")
    from tests.serve.conftest import LiveServer

    s = LiveServer(long_folder)
    yield s
    s.close()


def test_run_against_real_llamalab_serve(live_long, tmp_path):
    """A random tiny model writes no valid tasks: every reply is counted (malformed or rejected), nothing crashes."""
    from llamalab.commands.selfinstruct import main

    out = tmp_path / "si"
    meta = main(si_config(live_long.url + "/v1", out, model="tiny-chat", num_instructions=3, max_requests=4,
                          max_tokens=24, requests_per_round=4))
    led = json.loads((out / LEDGER).read_text())
    assert meta["counts"]["requests"] == 4 and led["requests_failed"] == 0
    assert led["candidates"] == meta["counts"]["kept"] + led["rejected"]
    assert "max_requests" in meta["stop_reason"] and (out / "report.html").exists()
    assert meta["client_stats"]["sent"] == 4 and led["candidates"] >= 1  # the replies held text
