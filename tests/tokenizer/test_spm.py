"""Tokenizer: the real LLaMA SentencePiece model reproduces llama.cpp's reference cases; a
tokenizer trained on Botchan round-trips arbitrary Unicode and splits digits."""

from __future__ import annotations

import gzip

import pytest

from llamalab.common import LlamalabError
from llamalab.tokenizer import Tokenizer, TokenizerTrainConfig, train_tokenizer
from llamalab.tokenizer.spm import iter_lines
from tests.conftest import shared_path


def read_reference_cases(inp, out):
    """llama.cpp's .inp/.out pair, parsed as tests/test-tokenizer-0.cpp does."""
    sep = "\n__ggml_vocab_test__\n"
    raw = inp.read_bytes().decode("utf-8")
    texts, pos = [], 0
    while pos < len(raw):
        nxt = raw.find(sep, pos)
        if nxt == -1:
            texts.append(raw[pos:])
            break
        texts.append(raw[pos:nxt])
        pos = nxt + len(sep)
    outs = out.read_bytes().decode("utf-8").split("\n")
    if outs and outs[-1] == "":
        outs.pop()
    assert len(texts) == len(outs)
    return [(t, [int(x) for x in o.split()]) for t, o in zip(texts, outs)]


def test_llama_tokenizer_reference_cases():
    d = shared_path("tokenizer/llama_spm")
    tok = Tokenizer(d / "llama_tokenizer.model")
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.unk_id, tok.pad_id) == (32000, 1, 2, 0, -1)
    cases = read_reference_cases(d / "ggml-vocab-llama-spm.gguf.inp", d / "ggml-vocab-llama-spm.gguf.out")
    assert len(cases) == 46
    for text, ids in cases:
        assert tok.encode(text) == ids, text
    batch = tok.encode_batch([t for t, _ in cases], bos=True)
    assert batch == [[1] + ids for _, ids in cases]
    # decoding the ids gives the text back for the non-empty cases (SentencePiece drops the dummy prefix)
    assert tok.decode(tok.encode(" Hello, world!")) == " Hello, world!"


def test_trained_tokenizer_llama_options(botchan_tokenizer):
    tok = botchan_tokenizer
    assert tok.vocab_size == 1000 and tok.bos_id == 1 and tok.eos_id == 2 and tok.unk_id == 0
    trainer = tok.sp.serialized_model_proto()
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    m.ParseFromString(trainer)
    assert m.trainer_spec.model_type == pb.TrainerSpec.BPE
    assert m.trainer_spec.split_digits and m.trainer_spec.byte_fallback
    assert m.normalizer_spec.name == "identity"


@pytest.mark.parametrize("text", [
    "Botchan said 31415926 things 🦙🚀",
    "日本語のテキスト、中文字符和한국어",
    "tabs\tand  double  spaces\nnewlines\n\n",
    "Ünïcödé — “quotes” ½ ∑ x² ≠ y ≤ 3.14e-10",
    "",
])
def test_trained_tokenizer_roundtrips_unicode(botchan_tokenizer, text):
    tok = botchan_tokenizer
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.decode(ids[1:-1]) == text
    assert tok.unk_id not in ids  # byte fallback: nothing maps to <unk>


def test_digits_split_one_by_one(botchan_tokenizer):
    tok = botchan_tokenizer
    pieces = [tok.id_to_piece(i) for i in tok.encode("year 1906 and 42")]
    digits = [p.lstrip("\u2581") for p in pieces if any(c.isdigit() for c in p)]
    assert digits == list("1906") + list("42")


def test_compression_reported_and_sampling(tmp_path):
    src = shared_path("corpus/botchan.txt")
    cfg = TokenizerTrainConfig(inputs=[str(src)], output=str(tmp_path / "t"), vocab_size=600, max_sentences=500)
    tok, stats = train_tokenizer(cfg)
    assert stats["train_lines"] == 500 < stats["lines_seen"]
    assert 2.0 < stats["bytes_per_token"] < 6.0
    assert (tmp_path / "t" / "stats.json").exists() and (tmp_path / "t" / "tokenizer.model").exists()


def test_gzip_input(tmp_path, botchan_text):
    p = tmp_path / "b.txt.gz"
    with gzip.open(p, "wt", encoding="utf-8") as f:
        f.write(botchan_text)
    assert sum(1 for _ in iter_lines([p])) > 4000


def test_bad_tokenizer_inputs(tmp_path):
    with pytest.raises(LlamalabError, match="tokenizer file not found"):
        Tokenizer(tmp_path / "nope.model")
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"this is not a protobuf \x00\xff" * 10)
    with pytest.raises(LlamalabError, match="not a valid SentencePiece model"):
        Tokenizer(bad)
    nonutf = tmp_path / "x.txt"
    nonutf.write_bytes(b"fine line\nbad \xff\xfe line\n")
    with pytest.raises(LlamalabError, match=r"x.txt:2: not UTF-8"):
        train_tokenizer(TokenizerTrainConfig(inputs=[str(nonutf)], output=str(tmp_path / "o"), vocab_size=300))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(LlamalabError, match="hold no text"):
        train_tokenizer(TokenizerTrainConfig(inputs=[str(empty)], output=str(tmp_path / "o"), vocab_size=300))
