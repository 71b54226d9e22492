"""SFT data: loss masks cover exactly the assistant text; bad input is counted or rejected with a reason."""

from __future__ import annotations

import json

import pytest

from llamalab.common import LlamalabError
from llamalab.finetune.data import load_sft_data
from tests.conftest import shared_path
from tests.finetune.conftest import write_jsonl

ALPACA = [
    {"instruction": "Name the cat in the story.", "input": "", "output": "The cat is called Madonna."},
    {"instruction": "Translate to plain words.", "input": "red shirt", "output": "A shirt that is red."},
    {"instruction": "Say hello", "output": "Hello there, my friend!"},
]
CONV = {"conversations": [
    {"from": "system", "value": "You are a teacher in a small town."},
    {"from": "human", "value": "Where do you teach?"},
    {"from": "gpt", "value": "I teach mathematics at the middle school."},
    {"from": "human", "value": "Do you like it?"},
    {"from": "gpt", "value": "Not at all; the students are rude."},
    {"from": "human", "value": "Why stay?"},
    {"from": "gpt", "value": "Because I promised Kiyo I would."},
]}


def masked_spans(tok, ex, template: str = "llama2") -> list[str]:
    """Decoded runs of consecutive mask=1 tokens, each checked to end with the turn closer."""
    spans, cur = [], []
    for i, m in zip(ex.ids, ex.mask):
        if m:
            cur.append(i)
        elif cur:
            spans.append(cur)
            cur = []
    if cur:
        spans.append(cur)
    out = []
    for s in spans:
        text = tok.decode(s)
        if template == "chatml":  # closer is the text <|im_end|> in a vocabulary without that piece
            assert text.endswith("<|im_end|>")
            text = text[:-len("<|im_end|>")]
        else:
            assert s[-1] == tok.eos_id, "every assistant span ends with EOS"
        out.append(text.strip())
    return out


@pytest.mark.parametrize("template", ["alpaca", "llama2", "vicuna", "chatml"])
def test_alpaca_mask_is_exactly_the_output(tmp_path, sft_tok, template):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(ALPACA, indent=2), encoding="utf-8")
    exs, ledger = load_sft_data([path], "alpaca", template, sft_tok, max_len=512)
    assert ledger.read == 3 and ledger.kept == 3 and not ledger.dropped
    for ex, rec in zip(exs, ALPACA):
        assert masked_spans(sft_tok, ex, template) == [rec["output"]]
        prompt = sft_tok.decode([i for i, m in zip(ex.ids, ex.mask) if not m])
        assert rec["instruction"] in prompt and rec["output"] not in prompt
    if template == "alpaca":  # Stanford's with-input prompt, exactly
        text = sft_tok.decode(exs[1].ids)
        assert "paired with an input" in text and "### Input:\nred shirt\n\n### Response:\n" in text


@pytest.mark.parametrize("template", ["llama2", "vicuna", "alpaca", "chatml"])
def test_sharegpt_mask_covers_every_assistant_turn(tmp_path, sft_tok, template):
    path = write_jsonl(tmp_path / "conv.jsonl", [CONV])
    (ex,), ledger = load_sft_data([path], "sharegpt", template, sft_tok, max_len=512)
    answers = [t["value"] for t in CONV["conversations"] if t["from"] == "gpt"]
    assert masked_spans(sft_tok, ex, template) == answers
    assert ledger.loss_tokens == sum(ex.mask[1:])


def test_jsonl_lines_split_on_newline_only(tmp_path, sft_tok):
    rec = {"conversations": [{"from": "human", "value": "a\u2028b\x85c"}, {"from": "gpt", "value": "d\u2029e"}]}
    path = tmp_path / "u.jsonl"
    path.write_text(json.dumps(rec, ensure_ascii=False) + "\r\n" + json.dumps(CONV) + "\n", encoding="utf-8")
    exs, ledger = load_sft_data([path], "sharegpt", "llama2", sft_tok, 512)
    assert ledger.read == 2 and len(exs) == 2 and not ledger.dropped


def test_openai_messages_format(tmp_path, sft_tok):
    rec = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Good day to you."}]}
    (ex,), _ = load_sft_data([write_jsonl(tmp_path / "m.jsonl", [rec])], "sharegpt", "llama2", sft_tok, 256)
    assert masked_spans(sft_tok, ex) == ["Good day to you."]


def test_bad_records_are_counted_with_reasons(tmp_path, sft_tok):
    long_answer = "the quick brown fox " * 200
    recs = [
        CONV,
        {"conversations": [{"from": "human", "value": "anyone there?"}]},  # no assistant turn
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "bing", "value": "hello"}]},  # unknown role
        {"conversations": [{"from": "human", "value": "tell me"}, {"from": "gpt", "value": long_answer}]},
        {"conversations": [{"from": "gpt", "value": "...and so on."}, {"from": "human", "value": "ok"},
                           {"from": "gpt", "value": "Yes."}, {"from": "human", "value": "and?"}]},
    ]
    path = write_jsonl(tmp_path / "bad.jsonl", recs)
    exs, ledger = load_sft_data([path], "sharegpt", "llama2", sft_tok, max_len=300, overlong="drop")
    assert ledger.read == 5 and ledger.kept == 2 and len(exs) == 2
    assert ledger.dropped == {"no_assistant_turn": 1, "unknown_role": 1, "too_long": 1}
    assert ledger.fixes["leading_assistant_dropped"] == 1 and ledger.fixes["trailing_user_dropped"] == 1
    assert any(e.startswith(f"{path}:3:") and "bing" in e for e in ledger.errors)
    assert any(e.startswith(f"{path}:4:") and "max_len 300" in e for e in ledger.errors)
    assert masked_spans(sft_tok, exs[1]) == ["Yes."]


def test_overlong_truncate_and_split(tmp_path, sft_tok):
    path = write_jsonl(tmp_path / "c.jsonl", [CONV])
    full, _ = load_sft_data([path], "sharegpt", "llama2", sft_tok, max_len=1024)
    n = len(full[0])
    exs, ledger = load_sft_data([path], "sharegpt", "llama2", sft_tok, max_len=n - 5, overlong="split")
    assert len(exs) >= 2 and all(len(e) <= n - 5 for e in exs)
    assert [s for e in exs for s in masked_spans(sft_tok, e)] == [t["value"] for t in CONV["conversations"]
                                                                  if t["from"] == "gpt"]
    assert all("You are a teacher" in sft_tok.decode(e.ids) for e in exs), "system prompt repeated per chunk"
    assert ledger.fixes["split"] == 1
    exs, ledger = load_sft_data([path], "sharegpt", "llama2", sft_tok, max_len=n - 5, overlong="truncate")
    assert len(exs) == 1 and len(exs[0]) == n - 5 and ledger.tokens_cut == 5 and ledger.fixes["truncated"] == 1


def test_malformed_input_names_file_and_line(tmp_path, sft_tok):
    path = write_jsonl(tmp_path / "m.jsonl", [CONV, "{not json", {"conversations": "nope"}])
    with pytest.raises(LlamalabError, match=rf"{path}:2: invalid JSON"):
        load_sft_data([path], "sharegpt", "llama2", sft_tok, 512)
    exs, ledger = load_sft_data([path], "sharegpt", "llama2", sft_tok, 512, on_error="skip")
    assert len(exs) == 1 and ledger.dropped == {"malformed": 2}
    assert ledger.errors[0].startswith(f"{path}:2:") and ledger.errors[1].startswith(f"{path}:3:")
    arr = tmp_path / "a.json"
    arr.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c"}\n]', encoding="utf-8")
    with pytest.raises(LlamalabError, match=rf"{arr}:3 \(item 1\): field 'output'"):
        load_sft_data([arr], "alpaca", "alpaca", sft_tok, 512)


def test_real_sharegpt_sample_ledger_adds_up(sft_tok):
    path = shared_path("sft/sharegpt_sample.jsonl.gz")
    exs, ledger = load_sft_data([path], "sharegpt", "vicuna", sft_tok, max_len=1024, limit=300)
    assert ledger.read == 300
    assert ledger.kept + sum(ledger.dropped.values()) == ledger.read
    assert ledger.fixes["leading_assistant_dropped"] > 0  # the scrape starts mid-conversation often
    assert all(len(e) <= 1024 and any(e.mask[1:]) for e in exs)
