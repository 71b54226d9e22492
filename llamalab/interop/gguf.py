"""GGUF (llama.cpp's file format) <-> llamalab model folders, with the ``gguf`` package.

Export (``llamalab convert FOLDER out.gguf --to gguf --gguf-type f32|f16|q8_0``) writes the
``llama`` architecture keys, the weights under llama.cpp's tensor names and the SentencePiece
vocabulary (tokens, scores, types, special ids), so llama.cpp runs the file. Our q/k rows are in
Meta's interleaved-pair RoPE order, which is the order llama.cpp's ``llama`` architecture uses, so no
permutation is needed (the HF converter needs one; see ``interop/hf.py``). Norm weights stay f32;
with q8_0 every matrix is quantised in llama.cpp's q8_0 blocks (32 values, one f16 scale),
except matrices whose rows are not whole blocks, which are written f16 (as llama.cpp does).
The chat template name travels under ``llamalab.chat_template``.

Import (``llamalab convert model.gguf FOLDER``) reads LLaMA-architecture files, any tensor type the
``gguf`` package can dequantise (f32, f16, bf16, q8_0, q4_0, q4_K, ...), dequantised to f32 on load,
and both tokenizer kinds llama.cpp uses: ``llama`` (SentencePiece; rebuilt as a tokenizer.model
from the vocabulary, scores and token types) and ``gpt2`` (byte-level BPE; written as a
tokenizer.json for the ``tokenizers`` package and served by :class:`llamalab.tokenizer.BPETokenizer`).
Rope scaling and other architectures are refused with a message naming the key.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llamalab.common import LlamalabError, print0
from llamalab.model.config import ModelConfig
from llamalab.model.folder import load_into, load_model, save_model, tokenizer_path
from llamalab.model.transformer import Transformer

GGUF_TYPES = ("f32", "f16", "q8_0")


def _layer_names(i: int) -> dict[str, str]:
    b, m = f"blk.{i}.", f"layers.{i}."
    return {f"{b}attn_q.weight": f"{m}attention.wq.weight", f"{b}attn_k.weight": f"{m}attention.wk.weight",
            f"{b}attn_v.weight": f"{m}attention.wv.weight", f"{b}attn_output.weight": f"{m}attention.wo.weight",
            f"{b}ffn_gate.weight": f"{m}feed_forward.w1.weight", f"{b}ffn_down.weight": f"{m}feed_forward.w2.weight",
            f"{b}ffn_up.weight": f"{m}feed_forward.w3.weight", f"{b}attn_norm.weight": f"{m}attention_norm.weight",
            f"{b}ffn_norm.weight": f"{m}ffn_norm.weight"}


def name_map(cfg: ModelConfig) -> dict[str, str]:
    """GGUF tensor name -> llamalab tensor name."""
    m = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight"}
    if not cfg.tie_embeddings:
        m["output.weight"] = "output.weight"
    for i in range(cfg.n_layers):
        m.update(_layer_names(i))
    return m


# ----------------------------------------------------------------------------- export


def _add_spm_vocab(w: Any, tok_file: Path) -> None:
    from llamalab.tokenizer import Tokenizer

    tok = Tokenizer(tok_file)
    sp = tok.sp
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.IdToPiece(i))
        scores.append(sp.GetScore(i))
        t = 1
        if sp.IsUnknown(i):
            t = 2
        elif sp.IsControl(i):
            t = 3
        elif sp.IsUnused(i):
            t = 5
        elif sp.IsByte(i):
            t = 6
        types.append(t)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    if tok.bos_id >= 0:
        w.add_bos_token_id(tok.bos_id)
    if tok.eos_id >= 0:
        w.add_eos_token_id(tok.eos_id)
    if tok.unk_id >= 0:
        w.add_unk_token_id(tok.unk_id)
    if tok.pad_id >= 0:
        w.add_pad_token_id(tok.pad_id)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)


def add_llama_keys(w: Any, cfg: ModelConfig) -> None:
    """The ``llama.*`` architecture keys of ``cfg`` on a ``gguf.GGUFWriter``."""
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.ffn_hidden_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.kv_heads)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_vocab_size(cfg.vocab_size)


def export_gguf(model: Transformer, dst: str | Path, gguf_type: str = "f16", tok_file: Path | None = None,
                chat_template: str | None = None, name: str = "llamalab") -> Path:
    import gguf

    if gguf_type not in GGUF_TYPES:
        raise LlamalabError(f"gguf_type: {gguf_type!r} is not one of {', '.join(GGUF_TYPES)}")
    cfg = model.cfg
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(dst), "llama")
    w.add_name(name)
    add_llama_keys(w, cfg)
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type]
    w.add_file_type(ftype)
    if tok_file is not None:
        _add_spm_vocab(w, tok_file)
    if chat_template:
        w.add_string("llamalab.chat_template", chat_template)
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    for gname, ours in name_map(cfg).items():
        arr = sd[ours].numpy()
        if arr.ndim == 1 or gguf_type == "f32":
            w.add_tensor(gname, np.ascontiguousarray(arr, dtype=np.float32))
        elif gguf_type == "f16" or arr.shape[-1] % 32 != 0:  # q8_0 needs rows of whole 32-blocks (llama.cpp: f16)
            w.add_tensor(gname, arr.astype(np.float16))
        else:
            q = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(gname, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def export_gguf_folder(src: str | Path, dst: str | Path, gguf_type: str = "f16") -> Path:
    """llamalab model folder -> one .gguf file."""
    model, meta = load_model(src)
    tok = tokenizer_path(src)
    if tok is None:
        print0(f"gguf: {src} has no tokenizer.model; the GGUF file will hold no vocabulary")
    out = export_gguf(model, dst, gguf_type, tok, meta.get("chat_template"), name=Path(src).resolve().name)
    print0(f"gguf: wrote {out} ({gguf_type}, {out.stat().st_size / 1e6:.1f} MB)")
    return out


# ----------------------------------------------------------------------------- import


def _fields(reader: Any) -> dict[str, Any]:
    out = {}
    for k, f in reader.fields.items():
        try:
            out[k] = f.contents()
        except (ValueError, IndexError, TypeError):
            continue
    return out


def config_from_gguf(kv: dict[str, Any], where: str, vocab_size: int) -> ModelConfig:
    arch = kv.get("general.architecture")
    if arch != "llama":
        raise LlamalabError(f"{where}: general.architecture is {arch!r}; llamalab imports 'llama' GGUF files")
    scaling = kv.get("llama.rope.scaling.type")
    if scaling not in (None, "none"):
        raise LlamalabError(f"{where}: llama.rope.scaling.type={scaling!r} is not supported (plain RoPE only)")
    try:
        dim, n_heads = int(kv["llama.embedding_length"]), int(kv["llama.attention.head_count"])
        rot = kv.get("llama.rope.dimension_count")
        if rot is not None and int(rot) != dim // n_heads:
            raise LlamalabError(f"{where}: llama.rope.dimension_count={rot} (partial rotary) is not supported")
        return ModelConfig(dim=dim, n_layers=int(kv["llama.block_count"]), n_heads=n_heads,
                           n_kv_heads=int(kv.get("llama.attention.head_count_kv", n_heads)), vocab_size=vocab_size,
                           hidden_dim=int(kv["llama.feed_forward_length"]),
                           norm_eps=float(kv.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
                           rope_theta=float(kv.get("llama.rope.freq_base", 10000.0)),
                           max_seq_len=int(kv.get("llama.context_length", 2048)), tie_embeddings=False)
    except KeyError as e:
        raise LlamalabError(f"{where}: missing key {e.args[0]!r}") from None


def read_gguf_tensors(reader: Any, where: str) -> dict[str, torch.Tensor]:
    from gguf.quants import dequantize

    out = {}
    for t in reader.tensors:
        shape = tuple(int(x) for x in reversed(list(t.shape)))  # GGML lists the fastest dimension first
        try:
            arr = dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise LlamalabError(f"{where}: tensor {t.name} has type {t.tensor_type.name}, which the gguf package "
                                f"cannot dequantise") from None
        out[t.name] = torch.from_numpy(np.array(arr, dtype=np.float32).reshape(shape))
    return out


def spm_model_bytes(kv: dict[str, Any]) -> bytes:
    """A SentencePiece model rebuilt from a 'llama' GGUF vocabulary (tokens, scores, token types)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    tokens = kv["tokenizer.ggml.tokens"]
    scores = kv.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    types = kv.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    mp = pb.ModelProto()
    for piece, score, ttype in zip(tokens, scores, types):
        sp = mp.pieces.add()
        sp.piece, sp.score, sp.type = piece, float(score), int(ttype) if int(ttype) in (1, 2, 3, 4, 5, 6) else 1
    ts = mp.trainer_spec
    ts.model_type = pb.TrainerSpec.BPE
    ts.vocab_size = len(tokens)
    ts.byte_fallback = any(int(t) == 6 for t in types)
    ts.split_digits = ts.split_by_unicode_script = ts.split_by_number = ts.split_by_whitespace = True
    ts.allow_whitespace_only_pieces = True
    ts.max_sentencepiece_length = 16
    ts.unk_id = int(kv.get("tokenizer.ggml.unknown_token_id", 0))
    ts.bos_id = int(kv.get("tokenizer.ggml.bos_token_id", 1))
    ts.eos_id = int(kv.get("tokenizer.ggml.eos_token_id", 2))
    pad = kv.get("tokenizer.ggml.padding_token_id")
    ts.pad_id = int(pad) if pad is not None and int(pad) not in (ts.unk_id, ts.bos_id, ts.eos_id) else -1
    ts.unk_piece, ts.bos_piece, ts.eos_piece = tokens[ts.unk_id], tokens[ts.bos_id], tokens[ts.eos_id]
    if ts.pad_id >= 0:
        ts.pad_piece = tokens[ts.pad_id]
    ts.unk_surface = " \u2047 "
    ns = mp.normalizer_spec
    ns.name = "identity"
    ns.precompiled_charsmap = b""
    ns.add_dummy_prefix = bool(kv.get("tokenizer.ggml.add_space_prefix", True))
    ns.remove_extra_whitespaces = False
    ns.escape_whitespaces = True
    return mp.SerializeToString()


def bpe_tokenizer_json(kv: dict[str, Any]) -> dict[str, Any]:
    """A ``tokenizers`` tokenizer.json for a 'gpt2' (byte-level BPE) GGUF vocabulary."""
    tokens = kv["tokenizer.ggml.tokens"]
    merges = kv.get("tokenizer.ggml.merges") or []
    types = kv.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for i, (t, ty) in enumerate(zip(tokens, types)) if int(ty) == 3]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)}, "merges": list(merges)},
        "llamalab": {"bos_id": int(kv.get("tokenizer.ggml.bos_token_id", -1)),
                     "eos_id": int(kv.get("tokenizer.ggml.eos_token_id", -1))},
    }


def load_gguf(src: str | Path) -> tuple[Transformer, dict[str, Any]]:
    """Read a LLaMA GGUF file -> (model in f32, its key/value metadata)."""
    import gguf

    src = Path(src)
    if not src.is_file():
        raise LlamalabError(f"GGUF file not found: {src}")
    try:
        reader = gguf.GGUFReader(str(src))
    except (ValueError, OSError, AssertionError) as e:
        raise LlamalabError(f"{src}: not a readable GGUF file ({e})") from None
    kv = _fields(reader)
    tensors = read_gguf_tensors(reader, str(src))
    if "token_embd.weight" not in tensors:
        raise LlamalabError(f"{src}: no token_embd.weight tensor (a vocabulary-only GGUF file?)")
    vocab = tensors["token_embd.weight"].shape[0]
    cfg = config_from_gguf(kv, str(src), vocab)
    if "output.weight" not in tensors:  # llama.cpp ties the output to the embedding when it is absent
        cfg.tie_embeddings = True
    names = name_map(cfg)
    missing = sorted(set(names) - set(tensors))
    if missing:
        raise LlamalabError(f"{src}: missing tensors {missing[:4]}")
    sd = {ours: tensors[g] for g, ours in names.items()}
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    load_into(model, sd, str(src))
    return model.eval(), kv


def gguf_extra(src: Path, kv: dict[str, Any]) -> dict[str, Any]:
    """The config.json keys an imported GGUF file carries: where it came from and its chat template."""
    extra: dict[str, Any] = {"imported_from": {"format": "gguf", "path": str(src.resolve()),
                                               "file_type": kv.get("general.file_type"),
                                               "tokenizer": kv.get("tokenizer.ggml.model")}}
    if kv.get("llamalab.chat_template"):
        extra["chat_template"] = kv["llamalab.chat_template"]
    elif isinstance(kv.get("tokenizer.chat_template"), str):
        extra["gguf_chat_template"] = kv["tokenizer.chat_template"]
    return extra


def _tokenizer_kind(kv: dict[str, Any], where: str) -> str | None:
    kind = kv.get("tokenizer.ggml.model")
    if kind not in (None, "llama", "gpt2"):
        raise LlamalabError(f"{where}: tokenizer.ggml.model={kind!r} is not supported (llama or gpt2)")
    return kind


def gguf_tokenizer(kv: dict[str, Any], where: str) -> Any:
    """The file's tokenizer built in memory (SentencePiece or byte-level BPE), or None without a vocabulary."""
    kind = _tokenizer_kind(kv, where)
    if kind == "llama":
        from llamalab.tokenizer import Tokenizer

        return Tokenizer.from_bytes(spm_model_bytes(kv), where=where)
    if kind == "gpt2":
        from llamalab.tokenizer import BPETokenizer

        return BPETokenizer.from_spec(bpe_tokenizer_json(kv))
    return None


def import_gguf(src: str | Path, dst: str | Path) -> Path:
    """.gguf file -> llamalab model folder (tokenizer rebuilt from the file's vocabulary)."""
    import shutil
    import tempfile

    src = Path(src)
    model, kv = load_gguf(src)
    kind = _tokenizer_kind(kv, str(src))
    extra = gguf_extra(src, kv)
    tmp = Path(tempfile.mkdtemp(prefix="gguf-tok-"))
    try:
        tok_file = None
        if kind == "llama":
            tok_file = tmp / "tokenizer.model"
            tok_file.write_bytes(spm_model_bytes(kv))
        out = save_model(dst, model, tokenizer_path=tok_file, extra=extra)
        if kind == "gpt2":
            (out / "tokenizer.json").write_text(json.dumps(bpe_tokenizer_json(kv), ensure_ascii=False),
                                                encoding="utf-8")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print0(f"gguf: imported {src} ({kv.get('general.file_type')}, tokenizer {kind}) -> {out}")
    return out
