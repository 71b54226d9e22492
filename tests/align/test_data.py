"""Preference data: the pairs / HH readers, margins, bad input counted or named by file:line, the split by
prompt, encoding (prompt tokens carry no loss) and the summed answer log-probs."""

from __future__ import annotations

import gzip
import json

import pytest
import torch

from llamalab.align.data import (
    PairBatch,
    PreferenceLedger,
    PreferencePair,
    answer_logprobs,
    collate_pairs,
    encode_pairs,
    prompts_of,
    read_preferences,
    split_by_prompt,
)
from llamalab.common import LlamalabError
from llamalab.tokenizer.templates import render
from tests.align.conftest import MARKER, synthetic_pairs, write_jsonl
from tests.conftest import shared_path


def balanced(led: PreferenceLedger) -> bool:
    return led.read == led.kept + sum(led.dropped.values())


def test_pairs_format_strings_messages_conversations_and_margins(tmp_path):
    user = [{"role": "user", "content": "hi"}]
    recs = [
        {"prompt": "Tell me.", "chosen": "yes", "rejected": "no", "margin": 2},
        {"messages": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "a"},
                      {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
         "chosen": [{"role": "assistant", "content": "good"}], "rejected": "bad", "rating": "Better"},
        {"chosen": user + [{"role": "assistant", "content": "x"}],  # UltraFeedback shape: no prompt field
         "rejected": user + [{"role": "assistant", "content": "y"}], "rating": "significantly better"},
        {"prompt": "q", "system": "sys", "chosen": "1", "rejected": "2", "rating": "negligibly better / unsure"},
        {"prompt": "q", "chosen": "1", "rejected": "2", "rating": "slightly better"},
    ]
    pairs, led = read_preferences([write_jsonl(tmp_path / "p.jsonl", recs)])
    assert led.read == 5 and led.kept == 5 and not led.dropped
    assert pairs[0].prompt == [{"role": "user", "content": "Tell me."}] and pairs[0].margin == 2.0
    assert pairs[0].where.endswith("p.jsonl:1")
    assert pairs[1].prompt[0] == {"role": "system", "content": "be nice"} and pairs[1].prompt[-1]["content"] == "c"
    assert (pairs[1].chosen, pairs[1].rejected) == ("good", "bad")
    assert [p.margin for p in pairs[1:]] == pytest.approx([2 / 3, 1.0, 0.0, 1 / 3])
    assert pairs[2].prompt == user and (pairs[2].chosen, pairs[2].rejected) == ("x", "y")
    assert pairs[3].prompt == [{"role": "system", "content": "sys"}, {"role": "user", "content": "q"}]


def test_hh_dialogues_split_at_the_last_assistant_turn(tmp_path):
    shared = "\n\nHuman: hello there\n\nAssistant: hi\n\nHuman: how are you?"
    recs = [{"chosen": shared + "\n\nAssistant: fine thanks", "rejected": shared + "\n\nAssistant: go away"},
            {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: DIFFERENT\n\nAssistant: c"},
            {"chosen": "\n\nHuman: a\n\nHuman: more\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nHuman: more"
             "\n\nAssistant: c"}]
    for fmt in ("hh", "auto"):
        pairs, led = read_preferences([write_jsonl(tmp_path / "hh.jsonl", recs)], fmt=fmt)
        assert [p.chosen for p in pairs] == ["fine thanks", "b"] and pairs[0].rejected == "go away"
        assert pairs[0].prompt == [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "hi"},
                                   {"role": "user", "content": "how are you?"}]
        assert pairs[1].prompt == [{"role": "user", "content": "a\n\nmore"}] and led.fixes["same_role_merged"] == 1
        assert led.dropped == {"prompt_mismatch": 1} and "hh.jsonl:2" in led.errors[0] and balanced(led)


def test_bad_pairs_are_counted_with_their_line(tmp_path):
    recs = [{"prompt": "q", "chosen": "same", "rejected": " same "},
            {"prompt": "q", "chosen": "", "rejected": "x"},
            {"prompt": "q", "chosen": "a", "rejected": "   "},
            {"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
             "chosen": "x", "rejected": "y"},
            {"prompt": "fine", "chosen": "a", "rejected": "b"}]
    pairs, led = read_preferences([write_jsonl(tmp_path / "bad.jsonl", recs)])
    assert len(pairs) == 1 and pairs[0].where.endswith("bad.jsonl:5")
    assert led.dropped == {"identical": 1, "empty_answer": 2, "prompt_not_user": 1} and balanced(led)
    assert [e.split(": ")[0].rsplit(":", 1)[1] for e in led.errors] == ["1", "2", "3", "4"]


def test_malformed_json_names_file_and_line_or_is_counted(tmp_path):
    f = write_jsonl(tmp_path / "m.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}, "{not json",
                                           {"prompt": "q", "chosen": "a"},
                                           {"prompt": "q", "chosen": 3, "rejected": "b"},
                                           {"prompt": "q", "chosen": "a", "rejected": "b", "rating": "meh"}])
    with pytest.raises(LlamalabError, match=r"m\.jsonl:2: invalid JSON"):
        read_preferences([f])
    pairs, led = read_preferences([f], on_error="skip")
    assert len(pairs) == 1 and led.dropped == {"malformed": 4} and balanced(led)
    assert any("m.jsonl:3" in e and "'rejected' missing" in e for e in led.errors)
    assert any("m.jsonl:5" in e and "rating" in e for e in led.errors)
    m4 = write_jsonl(tmp_path / "m4.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}] * 2
                     + [{"prompt": "q", "chosen": "a"}])
    with pytest.raises(LlamalabError, match=r"m4\.jsonl:3: field 'rejected' missing"):
        read_preferences([m4])


def test_real_hh_file_reads_every_record_with_every_drop_counted():
    path = shared_path("preference/hh_rlhf_harmless_test.jsonl.gz")
    n_lines = sum(1 for ln in gzip.open(path, "rt", encoding="utf-8") if ln.strip())
    pairs, led = read_preferences([str(path)], fmt="auto")
    assert n_lines == led.read == 2312 and balanced(led) and len(pairs) == led.kept
    # independent count of what the HH rule must drop: differing prompts and empty answers
    mismatch = empty = 0
    for ln in gzip.open(path, "rt", encoding="utf-8"):
        r = json.loads(ln)
        i, j = r["chosen"].rfind("\n\nAssistant:"), r["rejected"].rfind("\n\nAssistant:")
        if r["chosen"][:i] != r["rejected"][:j]:
            mismatch += 1
        elif not r["chosen"][i + 12:].strip() or not r["rejected"][j + 12:].strip():
            empty += 1
    assert led.dropped == {"prompt_mismatch": mismatch, "empty_answer": empty} and mismatch + empty > 0
    assert all(p.prompt[-1]["role"] == "user" for p in pairs)
    train, held = split_by_prompt(pairs, 0.1, seed=0)
    assert len(train) + len(held) == len(pairs) and 0.07 < len(held) / len(pairs) < 0.13


def test_split_by_prompt_is_seeded_and_keeps_prompts_on_one_side():
    pairs = [PreferencePair([{"role": "user", "content": r["prompt"]}], r["chosen"], r["rejected"])
             for r in synthetic_pairs(200, seed=1, n_topics=20)]
    assert len(prompts_of(pairs)) == 20
    train, held = split_by_prompt(pairs, 0.25, seed=3)
    assert (train, held) == split_by_prompt(pairs, 0.25, seed=3)
    assert {p.prompt[0]["content"] for p in train}.isdisjoint({p.prompt[0]["content"] for p in held})
    assert held and len(train) + len(held) == 200
    assert split_by_prompt(pairs, 0.25, seed=4) != (train, held)
    # a pair's side does not depend on the other pairs in the file
    _, held_sub = split_by_prompt(pairs[:100], 0.25, seed=3)
    assert held_sub == [p for p in held if p in pairs[:100]] or not held_sub
    assert split_by_prompt(pairs, 0.0, seed=0) == (pairs, [])
    assert split_by_prompt(pairs[:2], 0.01, seed=0)[1]  # at least one prompt held out


def _pair(prompt: str, chosen: str, rejected: str, **kw) -> PreferencePair:
    return PreferencePair([{"role": "user", "content": prompt}], chosen, rejected, **kw)


@pytest.mark.parametrize("template", ["llama2", "chatml", "alpaca"])
def test_encoding_puts_the_loss_on_the_answer_only(align_tok, template):
    multi = PreferencePair([{"role": "user", "content": "Where is the school?"},
                            {"role": "assistant", "content": "In the town."},
                            {"role": "user", "content": "And the river?"}], "It is near the hill.",
                           "I do not know.", margin=0.5)
    led = PreferenceLedger(read=1, kept=1)
    (e,) = encode_pairs([multi], align_tok, template, 128, led)
    prompt_ids, _ = render(multi.prompt, template, align_tok, add_generation_prompt=True)
    for ids, answer in ((e.chosen, multi.chosen), (e.rejected, multi.rejected)):
        assert ids[:e.prompt_len] == prompt_ids[:e.prompt_len]
        full, _ = render(multi.prompt + [{"role": "assistant", "content": answer}], template, align_tok, False)
        assert ids == full
    b = collate_pairs([e], pad_id=0)
    assert b.units() == 1 and b.tokens.shape[0] == 2 and b.margin.tolist() == [0.5]
    for row, answer in ((0, multi.chosen), (1, multi.rejected)):
        targets = b.tokens[row, 1:][b.loss_mask[row, :-1]].tolist()
        assert not b.loss_mask[row, :e.prompt_len - 1].any()  # no prompt token is a target
        text = align_tok.decode(targets)
        assert answer in text and "school" not in text and "In the town" not in text
        assert b.last_index[row] == len(e.chosen if row == 0 else e.rejected) - 1
    assert led.encoded == 1 and led.answer_tokens == int(b.loss_mask.sum())


def test_encoding_drops_long_prompts_and_truncates_long_answers(align_tok):
    long_prompt = " ".join(["the school"] * 100)
    pairs = [_pair(long_prompt, "yes", "no", where="f:1"), _pair("q", "a " * 80 + "good", "a " * 80 + "bad",
                                                                    where="f:2"),
             _pair("q", "good " * 60, "bad " * 60, where="f:3"), _pair("q", "same", "same", where="f:4"),
             _pair("q", "", "x", where="f:5")]
    led = PreferenceLedger(read=5, kept=5)
    out = encode_pairs(pairs, align_tok, "llama2", 32, led)
    assert [e.where for e in out] == ["f:3"] and all(len(e.chosen) == len(e.rejected) == 32 for e in out)
    assert led.dropped == {"prompt_too_long": 1, "identical_after_truncation": 1, "identical": 1, "empty_answer": 1}
    assert led.fixes["truncated"] == 1 and balanced(led)  # a fix of kept pairs only
    assert any(e.startswith("f:1: prompt of") for e in led.errors)


def test_answer_logprobs_equal_a_direct_sum(align_tok, align_base):
    from llamalab.model.folder import load

    model = load(align_base, device="cpu", dtype=torch.float32).model.eval()
    recs = synthetic_pairs(3, seed=2)
    led = PreferenceLedger(read=3, kept=3)
    enc = encode_pairs([_pair(r["prompt"], r["chosen"], r["rejected"]) for r in recs], align_tok, "llama2", 64, led)
    b = collate_pairs(enc, pad_id=0)
    assert isinstance(b, PairBatch) and b.tokens.shape[0] == 6
    with torch.no_grad():
        got = answer_logprobs(model, b.tokens, b.loss_mask)
        for i, e in enumerate(enc + enc):
            ids = (e.chosen if i < 3 else e.rejected)
            mask = e.chosen_mask if i < 3 else e.rejected_mask
            lp = torch.log_softmax(model(torch.tensor([ids]))[0], -1)  # unpadded row, alone
            want = sum(float(lp[t - 1, ids[t]]) for t in range(1, len(ids)) if mask[t])
            assert abs(float(got[i]) - want) < 1e-4
    assert MARKER in recs[0]["chosen"]
