"""Hostile and broken GGUF files end in one LlamalabError line naming the file, never a traceback.

Each bad file is a small valid GGUF that we export, with a few bytes rewritten at offsets found by plain byte
arithmetic on the GGUF layout (not by our reader). The reader itself is checked against the ``gguf`` package's
GGUFReader on valid files.
"""

from __future__ import annotations

import random
import struct
import subprocess
import sys

import pytest
import torch

from llamalab.common import LlamalabError
from tests.conftest import shared_path

gguf = pytest.importorskip("gguf")

TOK = "tokenizer/llama_spm/llama_tokenizer.model"


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A 2-layer f32 GGUF without a vocabulary (fast to read) and its bytes."""
    from llamalab.interop.gguf import export_gguf
    from llamalab.model import ModelConfig, Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, multiple_of=16,
                                    max_seq_len=64)).eval()
    path = export_gguf(model, tmp_path_factory.mktemp("gguf") / "good.gguf", "f32")
    return path, path.read_bytes()


@pytest.fixture(scope="module")
def with_vocab(tmp_path_factory):
    """A 1-layer f16 GGUF carrying the LLaMA SentencePiece vocabulary."""
    from llamalab.interop.gguf import export_gguf
    from llamalab.model import ModelConfig, Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=32, n_layers=1, n_heads=4, vocab_size=32000, multiple_of=16,
                                    max_seq_len=64)).eval()
    path = export_gguf(model, tmp_path_factory.mktemp("gguf") / "vocab.gguf", "f16", tok_file=shared_path(TOK),
                       chat_template="chatml")
    return path, path.read_bytes()


def _patch(blob: bytes, pos: int, fmt: str, value) -> bytes:
    b = bytearray(blob)
    struct.pack_into(fmt, b, pos, value)
    return bytes(b)


def _tensor_info(blob: bytes, name: str) -> tuple[int, int]:
    """-> (byte offset of the tensor's n_dims field, n_dims): its info is name, n_dims u32, dims u64[n], type u32,
    offset u64."""
    at = blob.index(struct.pack("<Q", len(name)) + name.encode()) + 8 + len(name)
    return at, struct.unpack_from("<I", blob, at)[0]


def _value_at(blob: bytes, key: str) -> int:
    """Byte offset of a metadata key's value (after its u64 length, the key and its u32 type)."""
    return blob.index(struct.pack("<Q", len(key)) + key.encode()) + 8 + len(key) + 4


def _hostile(blob: bytes) -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, what the one-line error must say)."""
    at, nd = _tensor_info(blob, "token_embd.weight")
    dims, ttype, offset = at + 4, at + 4 + 8 * nd, at + 4 + 8 * nd + 4
    return {
        "bad magic": (b"GGUX" + blob[4:], "not a GGUF file"),
        "empty file": (b"", "not a GGUF file"),
        "magic only": (b"GGUF\x03\x00\x00\x00", "shorter than a GGUF header"),
        "version 99": (_patch(blob, 4, "<I", 99), "version 99"),
        "n_tensors 2^62": (_patch(blob, 8, "<Q", 2**62), "4,611,686,018,427,387,904 tensors"),
        "n_kv 2^62": (_patch(blob, 16, "<Q", 2**62), "4,611,686,018,427,387,904 metadata keys"),
        "n_kv beyond the file": (_patch(blob, 16, "<Q", 60_000), "more than a file of"),
        "key length 2^62": (_patch(blob, 24, "<Q", 2**62), "metadata key #0 .* is 4,611,686,018,427,387,904 bytes"),
        "truncated header": (blob[:300], "truncated or corrupt"),
        "truncated data": (blob[:len(blob) // 2], "runs past the end of the file"),
        "last byte missing": (blob[:-1], "runs past the end of the file"),
        "tensor offset past the end": (_patch(blob, offset, "<Q", 2**40), "token_embd.weight .* runs past the end"),
        "tensor offset unaligned": (_patch(blob, offset, "<Q", 3), "not a multiple of the alignment"),
        "dims overflow int64": (_patch(_patch(blob, dims, "<Q", 2**63), dims + 8, "<Q", 2**63),
                                "token_embd.weight of shape \\[9223372036854775808, 9223372036854775808\\]"),
        "dims exceed the file": (_patch(blob, dims + 8, "<Q", 10**6), "token_embd.weight of shape \\[64, 1000000\\]"),
        "n_dims 2^31": (_patch(blob, at, "<I", 2**31), "2,147,483,648 dimensions"),
        "unknown tensor type": (_patch(blob, ttype, "<I", 999), "unknown type 999"),
        "unknown value type": (_patch(blob, _value_at(blob, "general.architecture") - 4, "<I", 77),
                               "general.architecture has unknown value type 77"),
        "key not UTF-8": (blob.replace(b"general.architecture", b"general.architectur\xff", 1), "not UTF-8"),
        # llama.context_length renamed to general.architecture (both 20 bytes): the same key twice
        "duplicate key": (blob.replace(b"llama.context_length", b"general.architecture", 1), "appears twice"),
    }


CASES = ["bad magic", "empty file", "magic only", "version 99", "n_tensors 2^62", "n_kv 2^62", "n_kv beyond the file",
         "key length 2^62", "truncated header", "truncated data", "last byte missing", "tensor offset past the end",
         "tensor offset unaligned", "dims overflow int64", "dims exceed the file", "n_dims 2^31", "unknown tensor type",
         "unknown value type", "key not UTF-8", "duplicate key"]


def _one_line(e: BaseException, path) -> str:
    msg = str(e)
    assert "\n" not in msg and str(path) in msg, msg
    return msg


@pytest.mark.parametrize("case", CASES)
def test_hostile_gguf_is_one_error_line_from_load(good, tmp_path, case):
    from llamalab.model.folder import load

    data, want = _hostile(good[1])[case]
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data)
    with pytest.raises(LlamalabError, match=want) as e:
        load(bad, device="cpu", with_tokenizer=False)
    _one_line(e.value, bad)


@pytest.mark.parametrize("case", CASES)
def test_hostile_gguf_through_the_cli_exits_2_with_one_line(good, tmp_path, capsys, case):
    from llamalab.cli import main

    data, want = _hostile(good[1])[case]
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data)
    assert main(["convert", str(bad), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("error: ") and str(bad) in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["n_kv 2^62", "tensor offset past the end", "dims overflow int64"])
def test_hostile_gguf_cli_subprocess(good, tmp_path, case):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(_hostile(good[1])[case][0])
    proc = subprocess.run([sys.executable, "-m", "llamalab", "convert", str(bad), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1 and str(bad) in proc.stderr, proc.stderr


def _meta_cases(blob: bytes) -> dict[str, tuple[bytes, str]]:
    """Config values in a GGUF file's metadata (item 8 of the hardening issue), named by their GGUF key."""
    v = lambda key: _value_at(blob, key)  # noqa: E731
    return {
        "block_count 1e9": (_patch(blob, v("llama.block_count"), "<I", 10**9),
                            "llama.block_count must be between 1 and 4,096, got 1,000,000,000"),
        "embedding_length 2^20": (_patch(blob, v("llama.embedding_length"), "<I", 2**20),
                                  "llama.embedding_length must be between 2 and 131,072"),
        "context_length 4e9": (_patch(blob, v("llama.context_length"), "<I", 4 * 10**9),
                               "llama.context_length must be between 1 and 16,777,216"),
        "feed_forward_length -5": (_patch(_patch(blob, v("llama.feed_forward_length") - 4, "<I", 5),  # int32
                                          v("llama.feed_forward_length"), "<i", -5),
                                   "llama.feed_forward_length must be between 1 and 524,288, got -5"),
        "freq_base NaN": (_patch(blob, v("llama.rope.freq_base"), "<f", float("nan")),
                          "llama.rope.freq_base must be a finite number .* got nan"),
        "rms_eps 0": (_patch(blob, v("llama.attention.layer_norm_rms_epsilon"), "<f", 0.0),
                      "llama.attention.layer_norm_rms_epsilon must be a finite number above 0"),
        "head_count 0": (_patch(blob, v("llama.attention.head_count"), "<I", 0),
                         "llama.attention.head_count must be between 1"),
        "head_count_kv 3": (_patch(blob, v("llama.attention.head_count_kv"), "<I", 3),
                            r"llama.attention.head_count \(4\) must be divisible by llama.attention.head_count_kv"),
        "block_count a float": (_patch(_patch(blob, v("llama.block_count") - 4, "<I", 6),  # float32 2.0
                                       v("llama.block_count"), "<f", 2.0),
                                "metadata llama.block_count must be an integer, got 2.0"),
        "block_count 3 for 2 layers": (_patch(blob, v("llama.block_count"), "<I", 3),
                                       "llama.block_count is 3 but .* holds 2 layers"),
        "feed_forward_length 200 for 176": (_patch(blob, v("llama.feed_forward_length"), "<I", 200),
                                            r"ffn_gate.weight has shape \(176, 64\), .* needs \(200, 64\)"),
    }


@pytest.mark.parametrize("case", [
    "block_count 1e9", "embedding_length 2^20", "context_length 4e9", "feed_forward_length -5", "freq_base NaN",
    "rms_eps 0", "head_count 0", "head_count_kv 3", "block_count a float", "block_count 3 for 2 layers",
    "feed_forward_length 200 for 176"])
def test_insane_config_in_gguf_metadata_names_the_key(good, tmp_path, case):
    from llamalab.model.folder import load

    data, want = _meta_cases(good[1])[case]
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data)
    with pytest.raises(LlamalabError, match=want) as e:
        load(bad, device="cpu", with_tokenizer=False)
    _one_line(e.value, bad)


def test_bad_vocabulary_metadata(with_vocab, tmp_path):
    from llamalab.model.folder import load

    path, blob = with_vocab
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(_patch(blob, _value_at(blob, "tokenizer.ggml.bos_token_id"), "<I", 10**6))
    with pytest.raises(LlamalabError, match="tokenizer.ggml.bos_token_id=1000000 is not a token id") as e:
        load(bad, device="cpu")
    _one_line(e.value, bad)
    at = _value_at(blob, "tokenizer.ggml.token_type")  # an array: element type u32 (int32 = 5), then the length
    assert struct.unpack_from("<I", blob, at)[0] == 5
    bad.write_bytes(_patch(blob, at, "<I", 6))  # the same bytes read as float32 token types
    with pytest.raises(LlamalabError, match="tokenizer.ggml.token_type must be an array of 32,000 numbers"):
        load(bad, device="cpu")
    at = _value_at(blob, "tokenizer.ggml.tokens") + 4  # the array's length
    bad.write_bytes(_patch(blob, at, "<Q", 2**62))
    with pytest.raises(LlamalabError, match="tokenizer.ggml.tokens is an array of 4,611,686,018,427,387,904"):
        load(bad, device="cpu")
    bad.write_bytes(_patch(blob, at, "<Q", 4_000_000))  # within the cap, beyond what the file holds
    with pytest.raises(LlamalabError, match="claims 4,000,000 strings"):
        load(bad, device="cpu")


@pytest.mark.parametrize("which", ["good", "with_vocab"])
def test_random_header_corruption_never_escapes_as_a_traceback(request, tmp_path, which):
    """Seeded byte flips in the header: each load either succeeds or raises one LlamalabError line."""
    from llamalab.interop.gguf import read_gguf
    from llamalab.model.folder import load

    path, blob = request.getfixturevalue(which)
    header = min(t.offset for t in read_gguf(path).tensors.values())
    rng = random.Random(1234)
    bad = tmp_path / "fuzz.gguf"
    outcomes = {"ok": 0, "error": 0}
    for _ in range(60 if which == "good" else 25):
        b = bytearray(blob)
        for _ in range(rng.choice([1, 2, 3])):
            b[rng.randrange(0, header if rng.random() < 0.5 else min(header, 1500))] = rng.randrange(256)
        bad.write_bytes(bytes(b))
        try:
            load(bad, device="cpu", with_tokenizer=which == "with_vocab")
            outcomes["ok"] += 1
        except LlamalabError as e:
            _one_line(e, bad)
            outcomes["error"] += 1
    assert outcomes["error"] > 0, outcomes


def test_reader_matches_the_gguf_package(good, tmp_path):
    """Our checked reader gives GGUFReader's metadata, tensor infos and (dequantised) data on valid files."""
    from gguf.quants import dequantize

    from llamalab.interop.gguf import export_gguf, read_gguf, read_gguf_tensors
    from llamalab.model import ModelConfig, Transformer

    torch.manual_seed(3)
    q8 = export_gguf(Transformer(ModelConfig(dim=64, n_layers=1, n_heads=4, vocab_size=96, multiple_of=32,
                                             max_seq_len=32)), tmp_path / "q8.gguf", "q8_0")
    files = [good[0], q8, shared_path("tokenizer/llama_spm/ggml-vocab-llama-spm.gguf")]  # f32, q8_0, a vocabulary
    for path in files:
        ours, ref = read_gguf(path), gguf.GGUFReader(str(path))
        assert ours.kv == {k: f.contents() for k, f in ref.fields.items() if not k.startswith("GGUF.")}, path
        assert [(t.name, tuple(int(x) for x in t.shape), int(t.tensor_type), t.data_offset) for t in ref.tensors] == \
            [(t.name, t.shape, t.qtype, t.offset) for t in ours.tensors.values()], path
        data = read_gguf_tensors(ours, list(ours.tensors))
        for t in ref.tensors:
            want = torch.from_numpy(dequantize(t.data, t.tensor_type).astype("float32"))
            assert torch.equal(data[t.name], want.reshape(data[t.name].shape)), (path, t.name)
