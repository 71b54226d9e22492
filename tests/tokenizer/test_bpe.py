"""Byte-level BPE: tiny tokenizers trained here with the ``tokenizers`` package, encoded by llamalab and by
transformers' AutoTokenizer from the same files (the reference), on the >= 200 strings of cases.py; tiktoken
ranks against tiktoken itself; the BOS rule against transformers'; the export read back by AutoTokenizer;
the kind of a tokenizer.model told by its content."""

from __future__ import annotations

import base64
import json

import pytest

from llamalab.cli import main as cli_main
from llamalab.common import LlamalabError
from llamalab.tokenizer import BPETokenizer, Tokenizer, load_folder_tokenizer, open_tokenizer
from llamalab.tokenizer.bpe import bytes_to_unicode, is_tiktoken
from tests.tokenizer.cases import CHATML_SPECIALS, L3_SPECIALS, META_LLAMA3_PAT, hf_folder, train_bpe, varied_strings

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

STRINGS = varied_strings()


def _same_as_hf(ours, ref, strings=STRINGS):
    bad = [s for s in strings if ours.encode(s, bos=ours.add_bos) != ref(s)["input_ids"]]
    assert not bad, f"{len(bad)} of {len(strings)} differ, e.g. {bad[:3]!r}"


KINDS = {  # (pre-tokenizer, special tokens, tokenizer_config, BOS put first by the post-processor)
    "gpt2-chatml": ("gpt2", CHATML_SPECIALS, {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}, None),
    "llama3": ("llama3", L3_SPECIALS, {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"},
               "<|begin_of_text|>"),
    "digits": ("digits", CHATML_SPECIALS, {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}, None),
}


@pytest.mark.parametrize("name", list(KINDS))
def test_trained_tokenizer_json_encodes_as_autotokenizer(tmp_path, name):
    pre, specials, config, bos = KINDS[name]
    folder = hf_folder(tmp_path / "hf", train_bpe(pre, specials), config, bos)
    ours = load_folder_tokenizer(folder)
    ref = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert isinstance(ours, BPETokenizer) and len(STRINGS) >= 200
    assert ours.add_bos == (bos is not None) and ours.bos_id == ref.bos_token_id and ours.eos_id == ref.eos_token_id
    assert ours.vocab_size == len(ref)
    _same_as_hf(ours, ref)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    assert all(ours.encode(s, bos=ours.add_bos) == fast(s)["input_ids"] for s in STRINGS)
    for s in STRINGS:
        ids = ours.encode(s)
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
        if not any(t in s for t in specials):
            assert ours.decode(ids) == s  # byte-level: every string comes back

    # the export: the same three files HF writes, which AutoTokenizer and our loader read back unchanged
    out = tmp_path / "export"
    assert ours.save(out, chat_template="{{ messages[0]['content'] }}") == [
        "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
    back = transformers.AutoTokenizer.from_pretrained(str(out))
    _same_as_hf(ours, back)
    assert back.chat_template == "{{ messages[0]['content'] }}"
    again = load_folder_tokenizer(out)
    assert (again.bos_id, again.eos_id, again.pad_id, again.add_bos) == (ours.bos_id, ours.eos_id, ours.pad_id,
                                                                          ours.add_bos)
    assert again.sha256() == ours.sha256()


@pytest.mark.parametrize("post_bos", [True, False])
@pytest.mark.parametrize("flag", [True, False, None])
def test_bos_rule_follows_transformers(tmp_path, post_bos, flag, capsys):
    """For a tokenizer.json the post-processor decides, whatever tokenizer_config.json's add_bos_token says
    (transformers 5 ignores it there); a disagreeing flag is reported."""
    config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}
    if flag is not None:
        config["add_bos_token"] = flag
    folder = hf_folder(tmp_path, train_bpe("llama3", L3_SPECIALS, 400), config,
                     "<|begin_of_text|>" if post_bos else None)
    ours = load_folder_tokenizer(folder)
    ref = transformers.AutoTokenizer.from_pretrained(str(folder))
    want = ref("hello world")["input_ids"]
    assert ours.add_bos == (want[0] == ref.bos_token_id) == post_bos
    assert ours.encode("hello world", bos=ours.add_bos) == want
    assert ("add_bos_token" in capsys.readouterr().err) == (flag is not None and flag != post_bos)


def test_special_ids_from_config_json_when_the_tokenizer_files_name_none(tmp_path):
    """A bare tokenizer.json: BOS/EOS ids from config.json, every EOS id of a list is a stop id."""
    folder = hf_folder(tmp_path, train_bpe("llama3", L3_SPECIALS, 400), {})
    (folder / "tokenizer_config.json").unlink()
    ids = {s: i for i, s in enumerate(L3_SPECIALS)}
    (folder / "config.json").write_text(json.dumps({"bos_token_id": ids["<|begin_of_text|>"],
                                                    "eos_token_id": [ids["<|end_of_text|>"], ids["<|eot_id|>"]]}))
    tok = load_folder_tokenizer(folder)
    assert tok.bos_id == ids["<|begin_of_text|>"] and tok.eos_id == ids["<|end_of_text|>"]
    assert tok.stop_ids == sorted([ids["<|end_of_text|>"], ids["<|eot_id|>"]]) and not tok.add_bos
    assert tok.special_ids() == sorted(ids.values())


def _tiktoken_file(tmp_path):
    """A small tiktoken rank file: a byte-level BPE trained with Meta's regex, its tokens in merge order."""
    tk = train_bpe("llama3", [], 500)
    inv = {c: b for b, c in bytes_to_unicode().items()}
    tokens = sorted(tk.get_vocab().items(), key=lambda kv: kv[1])
    ranks = {bytes(inv[c] for c in t): i for t, i in tokens}
    path = tmp_path / "tokenizer.model"
    path.write_text("".join(f"{base64.b64encode(b).decode()} {r}\n" for b, r in ranks.items()))
    return path, ranks


def test_tiktoken_ranks_encode_as_tiktoken_and_transformers(tmp_path):
    tiktoken = pytest.importorskip("tiktoken")
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from llamalab.tokenizer.bpe import LLAMA3_SPECIAL_TOKENS, LLAMA3_SPLIT

    assert LLAMA3_SPLIT == META_LLAMA3_PAT == TikTokenConverter().pattern
    path, ranks = _tiktoken_file(tmp_path)
    n = len(ranks)
    ours = BPETokenizer(path)
    assert ours.vocab_size == n + 256 and ours.bos_id == n and ours.eos_id == n + 1 and ours.add_bos
    specials = {s: n + i for i, s in enumerate(LLAMA3_SPECIAL_TOKENS)}
    enc = tiktoken.Encoding(name="t", pat_str=META_LLAMA3_PAT, mergeable_ranks=ranks, special_tokens=specials)
    bad = [s for s in STRINGS if ours.encode(s) != enc.encode(s, allowed_special="all")]
    assert not bad, bad[:3]
    # transformers converts the same file itself (TikTokenConverter) when a folder holds only tokenizer.model;
    # without add_bos_token it adds no BOS, Meta's code always does (our default): both honour the flag
    for flag in (True, False):
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
            "eos_token": "<|end_of_text|>", "add_bos_token": flag,
            "added_tokens_decoder": {str(i): {"content": s, "special": True} for s, i in specials.items()}}))
        ours = load_folder_tokenizer(tmp_path)
        assert ours.add_bos is flag
        _same_as_hf(ours, transformers.AutoTokenizer.from_pretrained(str(tmp_path)))


def test_tokenizer_model_kind_is_read_from_the_content(tmp_path, botchan_tokenizer, capsys):
    tt, _ = _tiktoken_file(tmp_path)
    sp = tmp_path / "spm" / "tokenizer.model"
    sp.parent.mkdir()
    botchan_tokenizer.save(sp.parent)
    assert is_tiktoken(tt) and not is_tiktoken(sp)
    assert isinstance(load_folder_tokenizer(tmp_path), BPETokenizer)
    spm = load_folder_tokenizer(sp.parent)
    assert isinstance(spm, Tokenizer) and spm.add_bos and spm.encode("Botchan") == botchan_tokenizer.encode("Botchan")
    (sp.parent / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    assert load_folder_tokenizer(sp.parent).add_bos is False
    assert load_folder_tokenizer(tmp_path / "nothing-here") is None
    assert isinstance(open_tokenizer(tt), BPETokenizer) and isinstance(open_tokenizer(sp), Tokenizer)
    assert cli_main(["tokenizer", "encode", str(tt), "--text", "hi", "--bos"]) == 0
    assert capsys.readouterr().out.startswith(str(BPETokenizer(tt).encode("hi", bos=True)))


def test_bad_files_are_named(tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_text("IQ== 0\nIg== one\n")
    with pytest.raises(LlamalabError, match=r"tokenizer.model:2: not a tiktoken rank line"):
        BPETokenizer(bad)
    bad.write_text("IQ== 0\nIg== 5\n")
    with pytest.raises(LlamalabError, match="ranks are not 0..1"):
        BPETokenizer(bad)
    spec = json.loads(train_bpe("gpt2", CHATML_SPECIALS, 300).to_str())
    with pytest.raises(LlamalabError, match="bos_token '<nope>' is not a token"):
        BPETokenizer.from_spec(spec, bos="<nope>", where="x/tokenizer.json")
    with pytest.raises(LlamalabError, match="eos_token id 99999 is outside the vocabulary"):
        BPETokenizer.from_spec(spec, eos=99999)
    with pytest.raises(LlamalabError, match="model.type is 'WordPiece'"):
        BPETokenizer.from_spec({**spec, "model": {"type": "WordPiece"}})
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(LlamalabError, match="tokenizer.json: not a valid tokenizer.json"):
        BPETokenizer(tmp_path / "tokenizer.json")
