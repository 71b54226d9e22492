"""GGUF (llama.cpp's file format) <-> llamalab model folders, with the ``gguf`` package.

Export (``llamalab convert FOLDER out.gguf --to gguf --gguf-type f32|f16|q8_0|q4_0|q4_1``) writes the
``llama`` architecture keys, the weights under llama.cpp's tensor names and the vocabulary of either
tokenizer kind, so llama.cpp (and transformers' GGUF loading) run the file: a SentencePiece model as
``tokenizer.ggml.model = llama`` (pieces, scores, token types), byte-level BPE as ``gpt2`` (tokens in the
byte-level alphabet, token types, merges, ``tokenizer.ggml.pre``: ``gpt2``, ``llama-bpe`` or ``smollm`` after
the tokenizer.json's pre-tokenizer; one llama.cpp has no name for is refused, not written wrong); for both the
special ids, ``add_bos_token`` (the tokenizer's BOS rule), EOT/EOM ids and ``tokenizer.chat_template`` (the
folder's template as Jinja). The vocabulary is padded with ``[PAD{i}]`` tokens to the model's embedding rows,
as llama.cpp's converters do. Our q/k rows are in Meta's interleaved-pair RoPE order, which is the order
llama.cpp's ``llama`` architecture uses, so no permutation is needed (the HF converter needs one; see
``interop/hf.py``). Norm weights stay f32; with q8_0 every matrix is quantised in llama.cpp's q8_0 blocks (32
values, one f16 scale), with q4_0/q4_1 the layers' matrices in those blocks and the embedding and output head in
q8_0 (llama.cpp's own q4 files keep the output at q6_k; at 4 bits it alone costs a 135M model 14 points of top-1
agreement), by the ``gguf`` package's quantisers, as llama.cpp's; matrices whose rows are not whole blocks are
written f16 (as llama.cpp does). The chat template name travels under ``llamalab.chat_template``.

Import (``llamalab convert model.gguf FOLDER``, or any command given the .gguf path) reads LLaMA-architecture
files with any tensor type the ``gguf`` package can dequantise (f32, f16, bf16, the legacy q4_0, q4_1, q5_0,
q5_1, q8_0, the k-quants q2_k .. q6_k, the i-quants), dequantised to f32 on load; q4_0, q4_1 and q8_0 matrices
also keep their blocks (``model.quant_weights``), which an engine built with ``quantize`` int8/int4 runs as they
are, without dequantising (:mod:`llamalab.inference.quantize`). It reads both tokenizer kinds
llama.cpp uses: ``llama`` (SentencePiece; rebuilt as a tokenizer.model from the vocabulary, scores and token
types) and ``gpt2`` (byte-level BPE, pre-tokenizer after ``tokenizer.ggml.pre``: ``gpt2``, ``llama-bpe``,
``smollm`` ...; served by :class:`llamalab.tokenizer.BPETokenizer`). The imported folder holds Hugging Face's
tokenizer files (tokenizer.model, or tokenizer.json + tokenizer_config.json; a ``tokenizer_config.json`` keeps
``add_bos_token: false``), so transformers reads them too; folders written by older versions (special ids under
a ``llamalab`` key of tokenizer.json) still load. Other architectures are refused with a message naming the key.

RoPE scaling travels in llama.cpp's own terms where GGUF defines them: ``linear`` and ``yarn`` as
``llama.rope.scaling.type`` / ``.factor`` / ``.original_context_length`` (yarn's ``.yarn_beta_fast``,
``.yarn_beta_slow``, ``.yarn_attn_factor``), ``llama3`` as llama.cpp's ``rope_freqs.weight`` tensor (one divisor
per frequency, as its converter writes it). What GGUF has no key for travels under ``llamalab.rope.scaling.*``
(llama3's factors, yarn's ``mscale``s, the ``dynamic`` type, which llama.cpp runs as plain RoPE). A llama.cpp
file with ``rope_freqs.weight`` and no llamalab keys is read back as llama3 scaling fitted to the tensor
(Meta's low_freq_factor 1), checked to reproduce it.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llamalab.common import LlamalabError, print0
from llamalab.model.config import ModelConfig, ModelConfigError, RopeScaling
from llamalab.model.folder import check_memory, check_weights, load_into, load_model, save_model
from llamalab.model.transformer import Transformer

GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0", "q4_1")
_HEAD_TENSORS = ("token_embd.weight", "output.weight")  # q8_0 in q4 files (llama.cpp keeps the output at q6_k)


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


def _padded(tokens: list[str], n: int, where: str) -> int:
    """How many placeholder tokens fill the vocabulary up to the model's ``n`` embedding rows (llama.cpp wants one
    token per row, as its converters write ``[PAD{i}]``); a vocabulary larger than the model is refused."""
    if len(tokens) > n:
        raise LlamalabError(f"{where}: the tokenizer has {len(tokens):,} tokens but the model only {n:,} "
                            f"embedding rows")
    return n - len(tokens)


def _add_special_ids(w: Any, tok: Any) -> None:
    """BOS/EOS/PAD ids, the BOS rule (``add_bos_token`` from ``tok.add_bos``) and the turn closers besides EOS."""
    if tok.bos_id >= 0:
        w.add_bos_token_id(tok.bos_id)
    if tok.eos_id >= 0:
        w.add_eos_token_id(tok.eos_id)
    if getattr(tok, "unk_id", -1) >= 0:
        w.add_unk_token_id(tok.unk_id)
    if tok.pad_id >= 0:
        w.add_pad_token_id(tok.pad_id)
    w.add_add_bos_token(bool(tok.add_bos))
    w.add_add_eos_token(False)
    others = [i for i in getattr(tok, "stop_ids", []) or [] if i != tok.eos_id]
    pieces = {i: tok.id_to_piece(i) for i in others}
    eom = [i for i in others if pieces[i] == "<|eom_id|>"]
    eot = [i for i in others if i not in eom]
    if eot:  # llama.cpp stops on EOS, EOT and EOM; more closers than that have no key
        w.add_eot_token_id(eot[0])
    if eom:
        w.add_eom_token_id(eom[0])


def _add_spm_vocab(w: Any, tok: Any, n_vocab: int, where: str) -> None:
    """A SentencePiece vocabulary as llama.cpp's 'llama' tokenizer: pieces, scores, token types, special ids."""
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
    pad = _padded(tokens, n_vocab, where)
    tokens += [f"[PAD{len(tokens) + i}]" for i in range(pad)]
    scores += [0.0] * pad
    types += [5] * pad
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    _add_special_ids(w, tok)


# our byte-level pre-tokenizers (llamalab.tokenizer.bpe.PRE_TOKENIZERS) -> the tokenizer.ggml.pre llama.cpp splits alike
GGUF_PRE_NAMES = {"gpt2": "gpt2", "llama3": "llama-bpe", "digits": "smollm"}


def bpe_pre_kind(spec: dict[str, Any], where: str) -> str:
    """Which of our byte-level pre-tokenizers a tokenizer.json uses (``gpt2``, ``llama3``, ``digits``), read from
    its ``pre_tokenizer``; LlamalabError when it is none of them (or the file normalizes text), as a GGUF file
    could not make llama.cpp tokenize the same way."""
    from llamalab.tokenizer.bpe import GPT2_SPLIT, LLAMA3_SPLIT

    if spec.get("normalizer") not in (None, {}):
        raise LlamalabError(f"{where}: the tokenizer.json has a normalizer ({spec['normalizer'].get('type')}); GGUF "
                            f"byte-level vocabularies have none, llama.cpp would tokenize differently")
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    steps = [x for x in steps or [] if isinstance(x, dict)]
    kinds = [x.get("type") for x in steps]

    def regex(x: dict[str, Any]) -> Any:
        pat = x.get("pattern") or {}
        return pat.get("Regex", pat.get("String")) if isinstance(pat, dict) else None

    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "digits"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        if regex(steps[0]) == LLAMA3_SPLIT:
            return "llama3"
        if regex(steps[0]) == GPT2_SPLIT:
            return "gpt2"
    raise LlamalabError(f"{where}: the tokenizer.json pre-tokenizer ({' + '.join(map(str, kinds)) or 'none'}) is not "
                        f"one a GGUF file can name ({', '.join(sorted(GGUF_PRE_NAMES.values()))}); llama.cpp would "
                        f"split text differently, so no GGUF vocabulary is written for it")


def _add_bpe_vocab(w: Any, tok: Any, n_vocab: int, where: str) -> None:
    """A byte-level BPE vocabulary as llama.cpp's 'gpt2' tokenizer: tokens in the byte-level alphabet, token types
    (special added tokens CONTROL, other added tokens USER_DEFINED), merges, ``tokenizer.ggml.pre``, special ids."""
    spec = tok.spec()
    model = spec["model"]
    if model.get("byte_fallback") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise LlamalabError(f"{where}: a BPE tokenizer.json with byte_fallback or subword affixes is not byte-level "
                            f"BPE; GGUF's 'gpt2' vocabulary cannot hold it")
    pre = GGUF_PRE_NAMES[bpe_pre_kind(spec, where)]
    added = {int(a["id"]): bool(a.get("special")) for a in spec.get("added_tokens") or []}
    tokens, types = [], []
    for i in range(tok.vocab_size):
        piece = tok.tk.id_to_token(i)
        tokens.append(piece if piece is not None else f"[PAD{i}]")
        types.append(5 if piece is None else (3 if added[i] else 4) if i in added else 1)
    pad = _padded(tokens, n_vocab, where)
    tokens += [f"[PAD{len(tokens) + i}]" for i in range(pad)]
    types += [5] * pad
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    _add_special_ids(w, tok)


def add_vocab(w: Any, tok: Any, n_vocab: int, where: str) -> None:
    """``tok`` (SentencePiece or byte-level BPE) as a GGUF ``tokenizer.ggml.*`` vocabulary of ``n_vocab`` tokens."""
    if getattr(tok, "kind", None) == "bpe":
        _add_bpe_vocab(w, tok, n_vocab, where)
    else:
        _add_spm_vocab(w, tok, n_vocab, where)


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
                chat_template: str | None = None, name: str = "llamalab", tokenizer: Any = None,
                jinja: str | None = None) -> Path:
    """Write ``model`` as one .gguf file.

    The vocabulary is ``tokenizer`` (either kind; or ``tok_file``, a SentencePiece tokenizer.model);
    ``chat_template`` (one of our names) travels as ``llamalab.chat_template``, ``jinja`` (the template as
    Jinja) as ``tokenizer.chat_template``, the key llama.cpp and transformers read.
    """
    import gguf

    if gguf_type not in GGUF_TYPES:
        raise LlamalabError(f"gguf_type: {gguf_type!r} is not one of {', '.join(GGUF_TYPES)}")
    cfg = model.cfg
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(dst), "llama")
    w.add_name(name)
    add_llama_keys(w, cfg)
    add_rope_scaling(w, cfg)
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
             "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1}[gguf_type]
    w.add_file_type(ftype)
    if tokenizer is None and tok_file is not None:
        from llamalab.tokenizer import Tokenizer

        tokenizer = Tokenizer(tok_file)
    if tokenizer is not None:
        add_vocab(w, tokenizer, cfg.vocab_size, str(dst))
    if chat_template:
        w.add_string("llamalab.chat_template", chat_template)
    if jinja:
        w.add_chat_template(jinja)
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    for gname, ours in name_map(cfg).items():
        arr = sd[ours].numpy()
        if arr.ndim == 1 or gguf_type == "f32":
            w.add_tensor(gname, np.ascontiguousarray(arr, dtype=np.float32))
        elif gguf_type == "f16" or arr.shape[-1] % 32 != 0:  # blocks need rows of whole 32-blocks (llama.cpp: f16)
            w.add_tensor(gname, arr.astype(np.float16))
        else:
            qtype = gguf.GGMLQuantizationType[("q8_0" if gname in _HEAD_TENSORS else gguf_type).upper()]
            w.add_tensor(gname, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def export_gguf_folder(src: str | Path, dst: str | Path, gguf_type: str = "f16") -> Path:
    """llamalab model folder -> one .gguf file, with its vocabulary (any kind) and chat template."""
    from llamalab.interop.hf import jinja_for
    from llamalab.tokenizer import load_folder_tokenizer

    model, meta = load_model(src)
    tok = load_folder_tokenizer(src)
    if tok is None:
        print0(f"gguf: {src} has no tokenizer; the GGUF file will hold no vocabulary (llama.cpp will refuse it)")
    out = export_gguf(model, dst, gguf_type, chat_template=meta.get("chat_template"), name=Path(src).resolve().name,
                      tokenizer=tok, jinja=jinja_for(meta, tok))
    print0(f"gguf: wrote {out} ({gguf_type}, {out.stat().st_size / 1e6:.1f} MB)")
    return out


# ----------------------------------------------------------------------------- RoPE scaling

ROPE_FREQS = "rope_freqs.weight"
_OURS = "llamalab.rope.scaling."  # what GGUF defines no key for


def llama3_rope_factors(head_dim: int, theta: float, s: RopeScaling) -> torch.Tensor:
    """llama.cpp's ``rope_freqs.weight`` for llama3 scaling: each frequency's divisor, (head_dim/2,) fp32, as
    its ``convert_hf_to_gguf.py`` computes it (1 above the high-frequency wavelength, ``factor`` below the
    low-frequency one, smoothed between)."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    old, low, high, factor = s.original_max_position_embeddings, s.low_freq_factor, s.high_freq_factor, s.factor
    wavelen = 2 * math.pi / freqs
    smooth = (old / wavelen - low) / (high - low)
    mid = 1 / ((1 - smooth) / factor + smooth)
    out = torch.where(wavelen > old / low, torch.full_like(freqs, factor), mid)
    return torch.where(wavelen < old / high, torch.ones_like(freqs), out).float()


def llama3_from_rope_factors(factors: torch.Tensor, head_dim: int, theta: float, where: str) -> RopeScaling | None:
    """The llama3 scaling that gives ``factors`` (a llama.cpp ``rope_freqs.weight``), assuming Meta's
    low_freq_factor = 1: factor is the largest divisor; the smoothed band fixes high_freq_factor and the
    original context (a least-squares line through it; Meta's high_freq_factor 4 when it holds one frequency
    or none). Checked: the fitted scaling must reproduce ``factors``; None when every divisor is 1."""
    if tuple(factors.shape) != (head_dim // 2,):
        raise LlamalabError(f"{where}: tensor {ROPE_FREQS} has shape {tuple(factors.shape)}; the head dim "
                            f"{head_dim} implies ({head_dim // 2},)")
    f = factors.double()
    if not bool(torch.isfinite(f).all()) or bool((f <= 0).any()):
        raise LlamalabError(f"{where}: tensor {ROPE_FREQS} holds non-positive or non-finite factors")
    factor = float(f.max())
    if factor <= 1 + 1e-6:
        return None
    wavelen = 2 * math.pi * theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    ones, lows = f <= 1 + 1e-5, f >= factor * (1 - 1e-5)
    mid = ~ones & ~lows
    high = 4.0
    if int(mid.sum()) >= 2:  # smooth = (old / wavelen - 1) / (high - 1) = a / wavelen - b
        smooth = (1 / f[mid] - 1 / factor) / (1 - 1 / factor)
        x = 1 / wavelen[mid]
        a, b = torch.linalg.lstsq(torch.stack([x, -torch.ones_like(x)], 1), smooth[:, None]).solution[:, 0].tolist()
        high, old = (1 + 1 / b, a / b) if b > 0 else (high, 0.0)
    elif int(mid.sum()) == 1:
        smooth = float((1 / f[mid] - 1 / factor) / (1 - 1 / factor))
        old = float(wavelen[mid]) * (smooth * (high - 1) + 1)
    else:  # no smoothed band: any (original, high) that keeps each frequency in its class gives these factors
        lo_w = float(wavelen[lows].min())
        old = math.floor(lo_w) if math.floor(lo_w) < lo_w else lo_w - 1  # every divided wavelength > original
        hi_w = float(wavelen[ones].max()) if bool(ones.any()) else 0.0
        if hi_w > 0 and old / high <= hi_w:  # every undivided wavelength < original / high
            high = (1 + old / hi_w) / 2
    # the fit carries float32 noise (3.999999): the shortest rounding that reproduces the tensor wins
    candidates = []
    for digits in (0, 1, 2, 3, 4, 6):
        try:
            candidates.append(RopeScaling("llama3", factor=round(factor, 6), original_max_position_embeddings=max(
                1, round(old)), low_freq_factor=1.0, high_freq_factor=round(high, digits)))
        except LlamalabError:
            continue
    for rtol in (1e-5, 1e-4):
        for s in candidates:
            if torch.allclose(llama3_rope_factors(head_dim, theta, s).double(), f, rtol=rtol, atol=0):
                return s
    raise LlamalabError(f"{where}: tensor {ROPE_FREQS} holds per-frequency factors that do not follow Llama 3's "
                        f"rope scaling (low_freq_factor 1); llamalab cannot represent them")


def add_rope_scaling(w: Any, cfg: ModelConfig) -> None:
    """``cfg.rope_scaling`` on a ``gguf.GGUFWriter``: llama.cpp's keys (and llama3's ``rope_freqs.weight``)
    where GGUF defines them, ``llamalab.rope.scaling.*`` for the rest."""
    import gguf

    s = cfg.rope_scaling
    if s is None:
        return
    if s.rope_type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(s.factor)
    elif s.rope_type == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(s.factor)
        w.add_rope_scaling_orig_ctx_len(s.original_max_position_embeddings)
        if s.beta_fast is not None:
            w.add_rope_scaling_yarn_beta_fast(s.beta_fast)
        if s.beta_slow is not None:
            w.add_rope_scaling_yarn_beta_slow(s.beta_slow)
        if s.attention_factor is not None:
            w.add_rope_scaling_yarn_attn_factor(s.attention_factor)
        for name in ("mscale", "mscale_all_dim"):
            if getattr(s, name) is not None:
                w.add_float32(_OURS + name, getattr(s, name))
        if s.truncate is not None:
            w.add_bool(_OURS + "truncate", s.truncate)
    else:  # llama3 or dynamic: no GGUF key; llama3 as llama.cpp's per-frequency tensor
        w.add_string(_OURS + "type", s.rope_type)
        w.add_float32(_OURS + "factor", s.factor)
        w.add_uint32(_OURS + "original_context_length", s.original_max_position_embeddings)
        if s.rope_type == "llama3":
            w.add_float32(_OURS + "low_freq_factor", s.low_freq_factor)
            w.add_float32(_OURS + "high_freq_factor", s.high_freq_factor)
            w.add_tensor(ROPE_FREQS, llama3_rope_factors(cfg.head_dim, cfg.rope_theta, s).numpy())
        else:
            print0("gguf: dynamic (NTK) RoPE scaling has no GGUF key; llama.cpp will run this file with plain "
                   "RoPE (llamalab reads it back from llamalab.rope.scaling.*)")


def rope_scaling_from_gguf(kv: dict[str, Any], g: GGUFFile, cfg: ModelConfig, where: str) -> RopeScaling | None:
    """The file's RoPE scaling (see :func:`add_rope_scaling`), its ``rope_freqs.weight`` checked against it."""
    factors = read_gguf_tensors(g, [ROPE_FREQS])[ROPE_FREQS] if ROPE_FREQS in g.tensors else None
    theirs, ours = kv.get("llama.rope.scaling.type"), kv.get(_OURS + "type")
    theirs = None if theirs == "none" else theirs
    attn = kv.get("llama.rope.scaling.attn_factor")
    if attn is not None and float(attn) != 1.0:
        raise LlamalabError(f"{where}: llama.rope.scaling.attn_factor={attn} is not supported")

    def num(key: str) -> Any:  # a float32 key back to the shortest decimal that rounds to it (1.3, not 1.2999999523)
        v = kv.get(key)
        return float(str(np.float32(v))) if isinstance(v, (int, float)) and not isinstance(v, bool) else v

    try:
        if ours is not None:
            if ours not in ("llama3", "dynamic") or theirs is not None:
                raise LlamalabError(f"{where}: {_OURS}type={ours!r} (with llama.rope.scaling.type={theirs!r}) "
                                    f"is not one llamalab writes (llama3 or dynamic, alone)")
            extra = {"low_freq_factor": num(_OURS + "low_freq_factor"),
                     "high_freq_factor": num(_OURS + "high_freq_factor")} if ours == "llama3" else {}
            orig = kv.get(_OURS + "original_context_length")
            s = RopeScaling(ours, factor=num(_OURS + "factor"), original_max_position_embeddings=
                            int(orig) if orig is not None else None, **extra)
        elif theirs is None:
            linear = num("llama.rope.scale_linear")  # the key of older files
            s = RopeScaling("linear", factor=linear) if linear not in (None, 1.0) else None
            if factors is not None:
                s = llama3_from_rope_factors(factors, cfg.head_dim, cfg.rope_theta, where)
                factors = None if s is None else factors
        elif theirs == "linear":
            s = RopeScaling("linear", factor=num("llama.rope.scaling.factor"))
        elif theirs == "yarn":
            ext = kv.get("llama.rope.scaling.yarn_ext_factor")
            log_mul = kv.get("llama.rope.scaling.yarn_log_multiplier")
            if ext not in (None, 1.0) or log_mul not in (None, 0.0):
                raise LlamalabError(f"{where}: llama.rope.scaling.yarn_ext_factor={ext} / yarn_log_multiplier="
                                    f"{log_mul} are not supported (transformers' yarn has no such knobs)")
            orig = kv.get("llama.rope.scaling.original_context_length", cfg.max_seq_len)
            truncate = kv.get(_OURS + "truncate")
            s = RopeScaling("yarn", factor=num("llama.rope.scaling.factor"), original_max_position_embeddings=int(orig),
                            beta_fast=num("llama.rope.scaling.yarn_beta_fast"),
                            beta_slow=num("llama.rope.scaling.yarn_beta_slow"),
                            attention_factor=num("llama.rope.scaling.yarn_attn_factor"),
                            mscale=num(_OURS + "mscale"), mscale_all_dim=num(_OURS + "mscale_all_dim"),
                            truncate=None if truncate is None else bool(truncate))
        else:
            raise LlamalabError(f"{where}: llama.rope.scaling.type={theirs!r} is not supported "
                                f"(linear, yarn, or llama3's {ROPE_FREQS})")
    except ModelConfigError as e:
        raise LlamalabError(f"{where}: RoPE scaling keys: {e}") from None
    if factors is not None:
        if s is None or s.rope_type != "llama3":
            raise LlamalabError(f"{where}: tensor {ROPE_FREQS} (per-frequency RoPE factors) with "
                                f"{'no' if s is None else s.rope_type} rope scaling is not supported")
        want = llama3_rope_factors(cfg.head_dim, cfg.rope_theta, s)
        if tuple(factors.shape) != tuple(want.shape) or not torch.allclose(factors.float(), want, rtol=1e-4):
            raise LlamalabError(f"{where}: tensor {ROPE_FREQS} does not match the llama3 scaling of its "
                                f"{_OURS}* keys")
    return s


# ----------------------------------------------------------------------------- import


# Bounds on what a GGUF header may ask us to hold (each far above real files: ~30 keys, ~300 tensors per
# 100 layers, a 262k vocabulary); within them, every count, length and offset is also checked against
# the file's size before anything is allocated from it.
MAX_KV = 1 << 16
MAX_TENSORS = 1 << 20
MAX_ARRAY = 1 << 22  # elements of one metadata array
MAX_ARRAY_TOTAL = 1 << 24  # elements of all metadata arrays together
MAX_NAME = 1 << 16  # bytes of a key or a tensor name
GGML_MAX_DIMS = 4
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY, _UINT32 = 8, 9, 4
# ModelConfig field -> where a GGUF file holds it, so that an error names the user's key
GGUF_KEYS = {"dim": "llama.embedding_length", "n_layers": "llama.block_count", "n_heads": "llama.attention.head_count",
             "n_kv_heads": "llama.attention.head_count_kv", "vocab_size": "the rows of token_embd.weight",
             "hidden_dim": "llama.feed_forward_length", "norm_eps": "llama.attention.layer_norm_rms_epsilon",
             "rope_theta": "llama.rope.freq_base", "max_seq_len": "llama.context_length"}


@dataclass
class GGUFTensor:
    """One tensor's header entry, checked: ``shape`` in GGML order (fastest dimension first)."""

    name: str
    shape: tuple[int, ...]
    qtype: int
    offset: int  # absolute byte offset of the data in the file
    n_elements: int
    n_bytes: int


@dataclass
class GGUFFile:
    """A GGUF file's header, read with every count, length and offset checked against the file."""

    path: Path
    version: int
    byteorder: str  # "<" or ">"
    kv: dict[str, Any]
    tensors: dict[str, GGUFTensor]
    size: int


class _Header:
    """A bounds-checked cursor over the file's bytes: every read says what it was reading when it fails."""

    def __init__(self, buf: Any, size: int, where: str) -> None:
        self.buf, self.size, self.where, self.pos, self.order = buf, size, where, 0, "<"
        self.array_total = 0

    def fail(self, what: str) -> LlamalabError:
        return LlamalabError(f"{self.where}: not a valid GGUF file: {what}")

    def need(self, n: int, what: str) -> int:
        if n > self.size - self.pos:
            raise self.fail(f"{what} at byte {self.pos:,} needs {n:,} bytes but the file ends at byte {self.size:,} "
                            f"(truncated or corrupt)")
        pos, self.pos = self.pos, self.pos + n
        return pos

    def scalar(self, code: str, what: str) -> Any:
        size = struct.calcsize(code)
        return struct.unpack_from(self.order + code, self.buf, self.need(size, what))[0]

    def string(self, what: str, limit: int | None = None) -> str:
        n = self.scalar("Q", f"the length of {what}")
        if limit is not None and n > limit:
            raise self.fail(f"{what} at byte {self.pos - 8:,} is {n:,} bytes long (limit {limit:,})")
        pos = self.need(n, f"{what} ({n:,} bytes)")
        try:
            return bytes(self.buf[pos:pos + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} at byte {pos:,} is not UTF-8 text") from None

    def value(self, vtype: int, key: str, in_array: bool = False) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype], f"the value of {key}")
        if vtype == _STRING:
            return self.string(f"the value of {key}")
        if vtype == _ARRAY and not in_array:
            etype = self.scalar("I", f"the element type of {key}")
            n = self.scalar("Q", f"the length of {key}")
            self.array_total += n
            if n > MAX_ARRAY or self.array_total > MAX_ARRAY_TOTAL:
                raise self.fail(f"{key} is an array of {n:,} elements (limits: {MAX_ARRAY:,} per array, "
                                f"{MAX_ARRAY_TOTAL:,} in all)")
            if etype in _SCALARS:
                code = _SCALARS[etype]
                pos = self.need(n * struct.calcsize(code), f"the {n:,} elements of {key}")
                return list(struct.unpack_from(f"{self.order}{n}{code}", self.buf, pos))
            if etype == _STRING:
                if n * 8 > self.size - self.pos:
                    raise self.fail(f"{key} claims {n:,} strings, more than the {self.size - self.pos:,} bytes left "
                                    f"can hold (truncated or corrupt)")
                return [self.string(f"{key}[{i}]") for i in range(n)]
            raise self.fail(f"{key} is an array of unsupported element type {etype}")
        raise self.fail(f"{key} has unknown value type {vtype}")


def read_gguf(path: str | Path) -> GGUFFile:
    """Read and check a GGUF header: magic, version, metadata and tensor infos, every count and offset against
    the file's size (a hostile or truncated file gives one error line naming it, never a traceback)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    where = str(path)
    try:
        size = path.stat().st_size
        if size < 24:
            raise LlamalabError(f"{where}: not a valid GGUF file: {size} bytes is shorter than a GGUF header")
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            h = _Header(buf, size, where)
            if buf[:4] != b"GGUF":
                raise h.fail(f"no GGUF magic (the file starts with {bytes(buf[:4])!r})")
            h.pos = 4
            version = h.scalar("I", "the version")
            if version & 0xFFFF == 0:  # written on a big-endian machine
                h.order = ">"
                version = struct.unpack(">I", struct.pack("<I", version))[0]
            if version not in (2, 3):
                raise h.fail(f"version {version} (llamalab reads GGUF versions 2 and 3)")
            n_tensors = h.scalar("Q", "the tensor count")
            n_kv = h.scalar("Q", "the metadata count")
            if n_kv > MAX_KV or n_tensors > MAX_TENSORS:
                raise h.fail(f"the header claims {n_kv:,} metadata keys and {n_tensors:,} tensors (limits: "
                             f"{MAX_KV:,} and {MAX_TENSORS:,})")
            if n_kv * 13 + n_tensors * 24 > size - h.pos:  # the smallest key/value and tensor info
                raise h.fail(f"the header claims {n_kv:,} metadata keys and {n_tensors:,} tensors, more than a file "
                             f"of {size:,} bytes can hold (truncated or corrupt)")
            kv: dict[str, Any] = {}
            for i in range(n_kv):
                key = h.string(f"metadata key #{i}", MAX_NAME)
                if key in kv:
                    raise h.fail(f"metadata key {key} appears twice")
                vtype = h.scalar("I", f"the type of {key}")
                kv[key] = h.value(vtype, key)
                if key == "general.alignment" and vtype != _UINT32:
                    raise h.fail("general.alignment must be a uint32")
            infos = []
            for i in range(n_tensors):
                name = h.string(f"the name of tensor #{i}", MAX_NAME)
                n_dims = h.scalar("I", f"the dimension count of tensor {name}")
                if n_dims > GGML_MAX_DIMS:
                    raise h.fail(f"tensor {name} has {n_dims:,} dimensions (GGML allows {GGML_MAX_DIMS})")
                dims = tuple(h.scalar("Q", f"a dimension of tensor {name}") for _ in range(n_dims))
                qtype = h.scalar("I", f"the type of tensor {name}")
                offset = h.scalar("Q", f"the data offset of tensor {name}")
                infos.append((name, dims, qtype, offset))
    except OSError as e:
        raise LlamalabError(f"{where}: cannot read the file ({e})") from None
    align = kv.get("general.alignment", 32)
    if align <= 0 or align & (align - 1):
        raise LlamalabError(f"{where}: not a valid GGUF file: general.alignment={align} is not a power of two")
    data_start = -(-h.pos // align) * align
    tensors: dict[str, GGUFTensor] = {}
    for name, dims, qtype, offset in infos:
        if name in tensors:
            raise h.fail(f"tensor {name} appears twice")
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
        except ValueError:
            raise h.fail(f"tensor {name} has unknown type {qtype}") from None
        n = math.prod(dims)
        if dims and dims[0] % block:
            raise h.fail(f"tensor {name}: its rows of {dims[0]:,} values are not whole blocks of {block} "
                         f"({GGMLQuantizationType(qtype).name})")
        n_bytes = n // block * type_size
        if offset % align:
            raise h.fail(f"tensor {name}: data offset {offset:,} is not a multiple of the alignment {align}")
        start = data_start + offset
        if start + n_bytes > size:
            raise h.fail(f"tensor {name} of shape {list(dims)} ({n_bytes:,} bytes at byte {start:,}) runs past the end "
                         f"of the file ({size:,} bytes; truncated or corrupt)")
        tensors[name] = GGUFTensor(name, dims, qtype, start, n, n_bytes)
    return GGUFFile(path, version, h.order, kv, tensors, size)


def _meta(kv: dict[str, Any], key: str, default: Any, where: str, kind: type) -> Any:
    """A metadata value of the expected kind (an int read for a float becomes one), else one error line."""
    v = kv.get(key, default)
    if kind is float and isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    if v is not None and (isinstance(v, bool) or not isinstance(v, kind)):
        raise LlamalabError(f"{where}: metadata {key} must be {'an integer' if kind is int else 'a number'}, "
                            f"got {v!r}")
    return v


def config_from_gguf(kv: dict[str, Any], where: str, vocab_size: int) -> ModelConfig:
    arch = kv.get("general.architecture")
    if arch != "llama":
        raise LlamalabError(f"{where}: general.architecture is {arch!r}; llamalab imports 'llama' GGUF files")
    for key in ("llama.embedding_length", "llama.block_count", "llama.attention.head_count",
                "llama.feed_forward_length"):
        if key not in kv:
            raise LlamalabError(f"{where}: missing key {key!r}")
    try:
        cfg = ModelConfig(dim=_meta(kv, "llama.embedding_length", None, where, int),
                          n_layers=_meta(kv, "llama.block_count", None, where, int),
                          n_heads=_meta(kv, "llama.attention.head_count", None, where, int),
                          n_kv_heads=_meta(kv, "llama.attention.head_count_kv", None, where, int),
                          vocab_size=vocab_size,
                          hidden_dim=_meta(kv, "llama.feed_forward_length", None, where, int),
                          norm_eps=_meta(kv, "llama.attention.layer_norm_rms_epsilon", 1e-5, where, float),
                          rope_theta=_meta(kv, "llama.rope.freq_base", 10000.0, where, float),
                          max_seq_len=_meta(kv, "llama.context_length", 2048, where, int), tie_embeddings=False)
    except ModelConfigError as e:
        raise e.at(where, GGUF_KEYS) from None
    rot = kv.get("llama.rope.dimension_count")
    if rot is not None and rot != cfg.head_dim:
        raise LlamalabError(f"{where}: llama.rope.dimension_count={rot!r} (partial rotary) is not supported; "
                            f"the head dim is {cfg.head_dim}")
    return cfg


def read_gguf_tensors(g: GGUFFile, names: list[str]) -> dict[str, torch.Tensor]:
    """The named tensors of a checked :class:`GGUFFile`, dequantised to f32 (shapes in PyTorch order)."""
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import dequantize, quant_shape_to_byte_shape

    data = np.memmap(g.path, dtype=np.uint8, mode="r")
    if data.shape[0] != g.size:
        raise LlamalabError(f"{g.path}: the file changed while it was read")
    plain = {0: "f4", 1: "f2", 28: "f8"}  # F32, F16, F64: read as numpy types in the file's byte order
    out = {}
    for name in names:
        t = g.tensors[name]
        qt = GGMLQuantizationType(t.qtype)
        shape = tuple(reversed(t.shape))  # GGML lists the fastest dimension first
        raw = data[t.offset:t.offset + t.n_bytes]
        if t.qtype in plain:
            arr = raw.view(np.dtype(g.byteorder + plain[t.qtype])).reshape(shape)
        elif g.byteorder != "<":
            raise LlamalabError(f"{g.path}: tensor {name} is {qt.name} in a big-endian file, which llamalab cannot "
                                f"read (f32 and f16 only)")
        else:
            try:
                arr = dequantize(raw.reshape(quant_shape_to_byte_shape(shape, qt)), qt)
            except NotImplementedError:
                raise LlamalabError(f"{g.path}: tensor {name} has type {qt.name}, which the gguf package "
                                    f"cannot dequantise") from None
        out[name] = torch.from_numpy(np.array(arr, dtype=np.float32).reshape(shape))
    del data
    return out


# GGML type id -> (block bytes, kind) of the legacy 32-value blocks the engine's int8/int4 linears run as they are
_BLOCKS = {2: (18, "q4_0"), 3: (20, "q4_1"), 8: (34, "q8_0")}


def block_weight(raw: np.ndarray, qtype: int, shape: tuple[int, ...]) -> Any:
    """A 2-D q4_0 / q4_1 / q8_0 tensor's bytes -> :class:`~llamalab.inference.quantize.QuantWeight` (the same
    integers and scales, nothing rounded: q4_0 ``(q - 8) d``, q4_1 ``q d + m`` = ``(q - 8) d + (m + 8 d)``, q8_0
    ``q d``); None for other types and shapes."""
    from llamalab.inference.quantize import BLOCK, QuantWeight

    if qtype not in _BLOCKS or len(shape) != 2 or shape[1] % BLOCK:
        return None
    nbytes, kind = _BLOCKS[qtype]
    b = np.asarray(raw).reshape(shape[0], shape[1] // BLOCK, nbytes)
    d = torch.from_numpy(b[..., :2].copy().view("<f2")[..., 0].astype(np.float32))
    if kind == "q8_0":
        q = torch.from_numpy(b[..., 2:].copy().view(np.int8).reshape(shape))
        return QuantWeight("q8", q, d)
    qs = b[..., nbytes - 16:]
    q = torch.from_numpy(np.concatenate([qs & 15, qs >> 4], -1).reshape(shape))
    zero = torch.zeros_like(d)
    if kind == "q4_1":
        zero = torch.from_numpy(b[..., 2:4].copy().view("<f2")[..., 0].astype(np.float32)) + 8 * d
    return QuantWeight("q4", q, d, zero)


def read_gguf_blocks(g: GGUFFile, names: list[str]) -> dict[str, Any]:
    """The named tensors stored as q4_0, q4_1 or q8_0 in a little-endian file, as their blocks
    (:func:`block_weight`), for the engine's quantised linears to run without dequantising."""
    if g.byteorder != "<":
        return {}
    data = np.memmap(g.path, dtype=np.uint8, mode="r")
    out = {}
    for name in names:
        t = g.tensors[name]
        qw = block_weight(data[t.offset:t.offset + t.n_bytes], t.qtype, tuple(reversed(t.shape)))
        if qw is not None:
            out[name] = qw
    del data
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


# llama.cpp's tokenizer.ggml.pre -> the pre-tokenizer of llamalab.tokenizer.bpe that splits text the same way
# (llama.cpp's llama-vocab.cpp regexes; 'smollm' & co split every digit first, as their tokenizer.json's Digits step)
GGUF_PRE_TOKENIZERS = {
    None: "gpt2", "default": "gpt2", "gpt2": "gpt2", "gpt-2": "gpt2", "mpt": "gpt2", "olmo": "gpt2", "jais": "gpt2",
    "llama3": "llama3", "llama-v3": "llama3", "llama-bpe": "llama3", "smaug-bpe": "llama3", "dbrx": "llama3",
    "falcon3": "llama3", "smollm": "digits", "starcoder": "digits", "refact": "digits", "codeshell": "digits",
    "command-r": "digits", "exaone": "digits",
}


def bpe_tokenizer_json(kv: dict[str, Any], where: str = "GGUF file") -> dict[str, Any]:
    """A ``tokenizers`` tokenizer.json for a 'gpt2' (byte-level BPE) GGUF vocabulary.

    The pre-tokenizer follows ``tokenizer.ggml.pre``; control tokens (type 3) are special added tokens,
    user-defined ones (type 4) plain added tokens; ``tokenizer.ggml.add_bos_token`` is the BOS rule (llama.cpp's
    default when absent: on for Llama 3's pre-tokenizer, off otherwise). The special ids ride along under
    the ``llamalab`` key.
    """
    from llamalab.tokenizer.bpe import byte_level_spec

    tokens = kv["tokenizer.ggml.tokens"]
    merges = kv.get("tokenizer.ggml.merges") or []
    types = kv.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    pre = kv.get("tokenizer.ggml.pre")
    if pre not in GGUF_PRE_TOKENIZERS:
        raise LlamalabError(f"{where}: tokenizer.ggml.pre={pre!r} is not supported; llamalab reads "
                            f"{', '.join(sorted(k for k in GGUF_PRE_TOKENIZERS if k))}")
    kind = GGUF_PRE_TOKENIZERS[pre]
    added = [(i, t, int(ty) == 3) for i, (t, ty) in enumerate(zip(tokens, types)) if int(ty) in (3, 4)]
    bos, eos = int(kv.get("tokenizer.ggml.bos_token_id", -1)), int(kv.get("tokenizer.ggml.eos_token_id", -1))
    add_bos = bool(kv.get("tokenizer.ggml.add_bos_token", kind == "llama3")) and 0 <= bos < len(tokens)
    spec = byte_level_spec({t: i for i, t in enumerate(tokens)}, merges, added, pre=kind,
                           ignore_merges=kind == "llama3", bos=(bos, tokens[bos]) if add_bos else None,
                           add_bos=add_bos)
    spec["llamalab"] = {"bos_id": bos, "eos_id": eos, "add_bos": add_bos}
    return spec


def load_gguf(src: str | Path) -> tuple[Transformer, dict[str, Any]]:
    """Read a LLaMA GGUF file -> (model in f32, its key/value metadata).

    The header is checked before anything is allocated (:func:`read_gguf`), then the config built from its
    metadata (:class:`ModelConfig` ranges, keys named), then the tensor infos against that config
    (:func:`~llamalab.model.folder.check_weights`) and the memory it needs; only then are weights read.
    """
    src = Path(src)
    if not src.is_file():
        raise LlamalabError(f"GGUF file not found: {src}")
    g = read_gguf(src)
    kv, where = g.kv, str(src)
    emb = g.tensors.get("token_embd.weight")
    if emb is None:
        raise LlamalabError(f"{src}: no token_embd.weight tensor (a vocabulary-only GGUF file?)")
    if len(emb.shape) != 2:
        raise LlamalabError(f"{src}: token_embd.weight has shape {list(emb.shape)}, not a 2-D table")
    cfg = config_from_gguf(kv, where, emb.shape[1])
    cfg.rope_scaling = rope_scaling_from_gguf(kv, g, cfg, where)
    if "output.weight" not in g.tensors:  # llama.cpp ties the output to the embedding when it is absent
        cfg.tie_embeddings = True
    names = name_map(cfg)
    extra = sorted(k for k in g.tensors if k not in names and not k.startswith("blk.") and k != ROPE_FREQS)
    if extra:
        print0(f"gguf: {src}: ignoring {len(extra)} tensor(s) llamalab does not use: {extra[:4]}")
    shapes = {k: tuple(reversed(t.shape)) for k, t in g.tensors.items() if k not in extra and k != ROPE_FREQS}
    check_weights(cfg, shapes, where, where, rename=names, names=GGUF_KEYS)
    tokens = kv.get("tokenizer.ggml.tokens")
    if isinstance(tokens, list) and len(tokens) > cfg.vocab_size:
        raise LlamalabError(f"{src}: tokenizer.ggml.tokens holds {len(tokens):,} tokens but token_embd.weight has "
                            f"only {cfg.vocab_size:,} rows")
    check_memory(cfg, sum(g.tensors[k].n_elements * 4 for k in names), where)
    tensors = read_gguf_tensors(g, list(names))
    sd = {ours: tensors[k] for k, ours in names.items()}
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    load_into(model, sd, where)
    # q4_0/q4_1/q8_0 matrices also keep their blocks: a quantised engine runs them as they are (inference/runner.py)
    params = dict(model.named_parameters())
    model.quant_weights = {names[k]: qw.bind(params[names[k]]) for k, qw in read_gguf_blocks(g, list(names)).items()}
    return model.eval(), kv


def gguf_extra(src: Path, kv: dict[str, Any]) -> dict[str, Any]:
    """The config.json keys an imported GGUF file carries: where it came from and its chat template."""
    extra: dict[str, Any] = {"imported_from": {"format": "gguf", "path": str(src.resolve()),
                                               "file_type": kv.get("general.file_type"),
                                               "tokenizer": kv.get("tokenizer.ggml.model")}}
    if isinstance(kv.get("llamalab.chat_template"), str) and kv["llamalab.chat_template"]:
        extra["chat_template"] = kv["llamalab.chat_template"]
    elif isinstance(kv.get("tokenizer.chat_template"), str):
        extra["gguf_chat_template"] = kv["tokenizer.chat_template"]
    return extra


def _tokenizer_kind(kv: dict[str, Any], where: str) -> str | None:
    kind = kv.get("tokenizer.ggml.model")
    if kind not in (None, "llama", "gpt2"):
        raise LlamalabError(f"{where}: tokenizer.ggml.model={kind!r} is not supported (llama or gpt2)")
    if kind is not None:
        check_vocab(kv, where)
        if kind == "llama" and len(kv["tokenizer.ggml.tokens"]) < 3:  # SentencePiece needs unk, bos and eos
            raise LlamalabError(f"{where}: tokenizer.ggml.tokens holds {len(kv['tokenizer.ggml.tokens'])} tokens, "
                                f"too few for a SentencePiece vocabulary")
    return kind


def check_vocab(kv: dict[str, Any], where: str) -> None:
    """The vocabulary keys of a GGUF file, checked before a tokenizer is built from them: their types, one score
    and one type per token, and special ids that are tokens of the vocabulary."""
    tokens = kv.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise LlamalabError(f"{where}: tokenizer.ggml.tokens must be a non-empty array of strings")
    for key, kinds in (("tokenizer.ggml.scores", (int, float)), ("tokenizer.ggml.token_type", (int,))):
        v = kv.get(key)
        if v is None:
            continue
        if not isinstance(v, list) or len(v) != len(tokens) or any(isinstance(x, bool) or not isinstance(x, kinds)
                                                                    for x in v):
            raise LlamalabError(f"{where}: {key} must be an array of {len(tokens):,} numbers, one per token")
    merges = kv.get("tokenizer.ggml.merges")
    if merges is not None and (not isinstance(merges, list) or not all(isinstance(m, str) for m in merges)):
        raise LlamalabError(f"{where}: tokenizer.ggml.merges must be an array of strings")
    pre = kv.get("tokenizer.ggml.pre")
    if pre is not None and not isinstance(pre, str):
        raise LlamalabError(f"{where}: tokenizer.ggml.pre must be a string, got {pre!r}")
    for name in ("unknown", "bos", "eos", "padding"):
        key = f"tokenizer.ggml.{name}_token_id"
        v = kv.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < len(tokens)):
            raise LlamalabError(f"{where}: {key}={v!r} is not a token id (the vocabulary has {len(tokens):,} tokens)")


def gguf_tokenizer(kv: dict[str, Any], where: str) -> Any:
    """The file's tokenizer built in memory (SentencePiece or byte-level BPE), or None without a vocabulary."""
    kind = _tokenizer_kind(kv, where)
    if kind == "llama":
        from llamalab.tokenizer import Tokenizer

        tok = Tokenizer.from_bytes(spm_model_bytes(kv), where=where)
        tok.add_bos = bool(kv.get("tokenizer.ggml.add_bos_token", True)) and tok.bos_id >= 0  # the file's BOS rule
        tok.stop_ids = sorted(set(tok.stop_ids) | set(_stop_ids(kv)))
        return tok
    if kind == "gpt2":
        from llamalab.tokenizer import BPETokenizer

        return BPETokenizer.from_spec(bpe_tokenizer_json(kv, where), stop_ids=_stop_ids(kv), where=where)
    return None


def _stop_ids(kv: dict[str, Any]) -> list[int]:
    """The turn closers a GGUF file names besides EOS (``tokenizer.ggml.eot_token_id``, ``eom_token_id``)."""
    n = len(kv.get("tokenizer.ggml.tokens") or [])
    ids = [kv.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    return [i for i in ids if isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n]


def import_gguf(src: str | Path, dst: str | Path) -> Path:
    """.gguf file -> llamalab model folder, the tokenizer rebuilt from the file's vocabulary and written in Hugging
    Face's files (:func:`llamalab.model.folder.save_tokenizer`: a SentencePiece tokenizer.model, with a
    tokenizer_config.json keeping ``add_bos_token: false``; or tokenizer.json + tokenizer_config.json)."""
    src = Path(src)
    model, kv = load_gguf(src)
    tok = gguf_tokenizer(kv, str(src))
    out = save_model(dst, model, extra=gguf_extra(src, kv), tokenizer=tok)
    print0(f"gguf: imported {src} ({kv.get('general.file_type')}, tokenizer {_tokenizer_kind(kv, str(src))}) "
           f"-> {out}")
    return out
