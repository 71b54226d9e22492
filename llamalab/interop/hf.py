"""Hugging Face LLaMA folders <-> llamalab model folders.

HF names live here and nowhere else. The one non-obvious step is RoPE: Meta's code rotates
adjacent pairs of each head (x[2j], x[2j+1]); HF's ``rotate_half`` rotates (x[j], x[j+D/2]).
The same model therefore has its q/k projection rows permuted within each head
(``permute_to_hf`` / ``permute_from_hf``), exactly as in transformers' own
``convert_llama_weights_to_hf.py``. The v/o projections and the MLP are not permuted.

Import reads ``config.json`` plus safetensors (one file or shards with an index). Pickle-based
``.bin``/``.pt`` weights are refused: we never unpickle a file a user hands us.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from llamalab.common import LlamalabError, print0, write_json_atomic
from llamalab.model.config import ModelConfig, ModelConfigError
from llamalab.model.folder import (
    check_memory,
    check_weights,
    load_into,
    load_model,
    read_config_json,
    safetensors_shapes,
    save_model,
    save_safetensors,
    write_spm_model,
)
from llamalab.model.transformer import Transformer

SUPPORTED_ARCHS = ("LlamaForCausalLM",)
REWARD_ARCH = "LlamaForSequenceClassification"  # a reward model (llamalab.align.reward) exports as this
REWARD_HEAD = "score.weight"  # its scalar head: the same name in both
MAX_SHARD_BYTES = 5 * 1024**3
# ModelConfig field -> the config.json field it is read from, so that an error names the user's field
HF_FIELDS = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
             "n_kv_heads": "num_key_value_heads", "vocab_size": "vocab_size", "hidden_dim": "intermediate_size",
             "norm_eps": "rms_norm_eps", "rope_theta": "rope_theta", "max_seq_len": "max_position_embeddings",
             "tie_embeddings": "tie_word_embeddings"}


def _number(v: Any) -> Any:
    """An int read for a float field as a float (10000 -> 10000.0); anything else unchanged, for validation."""
    return float(v) if isinstance(v, int) and not isinstance(v, bool) else v


def permute_to_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta (interleaved pairs) -> HF (halves) row order of a q or k projection."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def permute_from_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF (halves) -> Meta (interleaved pairs) row order of a q or k projection."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, 2, out_dim // n_heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


# ----------------------------------------------------------------------------- config


def _rope_theta(hf: dict[str, Any], where: str) -> float:
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling")
    for name, value in (("rope_parameters", params), ("rope_scaling", scaling)):
        if value is not None and not isinstance(value, dict):
            raise LlamalabError(f"{where}: field {name} must be an object, got {type(value).__name__}")
    return _number(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def config_from_hf(hf: dict[str, Any], where: str = "config.json") -> ModelConfig:
    archs = hf.get("architectures") or []
    archs = archs if isinstance(archs, list) else [archs]
    if hf.get("model_type") != "llama" or not any(a in SUPPORTED_ARCHS for a in archs):
        raise LlamalabError(f"{where}: unsupported architecture {archs or hf.get('model_type')!r} "
                            f"(field 'architectures'); llamalab imports {', '.join(SUPPORTED_ARCHS)}")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise LlamalabError(f"{where}: field {flag}=true is not supported (LLaMA has no biases)")
    if hf.get("hidden_act", "silu") != "silu":
        raise LlamalabError(f"{where}: field hidden_act={hf['hidden_act']!r}; only silu (SwiGLU) is supported")
    missing = [f for f in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                           "intermediate_size") if f not in hf]
    if missing:
        raise LlamalabError(f"{where}: missing field {missing[0]!r}")
    try:
        cfg = ModelConfig(
            dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=hf["num_attention_heads"],
            n_kv_heads=hf.get("num_key_value_heads"), vocab_size=hf["vocab_size"],
            hidden_dim=hf["intermediate_size"], norm_eps=_number(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=_rope_theta(hf, where), max_seq_len=max_seq_len_from_hf(hf, where),
            rope_scaling=rope_scaling_from_hf(hf, where),
            tie_embeddings=hf.get("tie_word_embeddings", False),
        )
    except ModelConfigError as e:
        raise e.at(where, HF_FIELDS) from None
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim != cfg.head_dim:
        raise LlamalabError(f"{where}: field head_dim={head_dim!r} differs from hidden_size/num_attention_heads "
                            f"({cfg.head_dim})")
    return cfg


def config_to_hf(cfg: ModelConfig, bos_id: int | None = 1, eos_id: int | list[int] | None = 2,
                 pad_id: int | None = None) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_hidden_dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "max_position_embeddings": cfg.max_seq_len, "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "initializer_range": 0.02,
        "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id, "torch_dtype": "float32",
        "use_cache": True, **rope_scaling_to_hf(cfg),
    }


def _rope_source(hf: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The object transformers reads RoPE parameters from, and its field name: a non-empty ``rope_scaling``
    wins over ``rope_parameters`` (transformers' ``convert_rope_params_to_dict``)."""
    scaling = hf.get("rope_scaling")
    if isinstance(scaling, dict) and scaling:
        return "rope_scaling", scaling
    params = hf.get("rope_parameters")
    return ("rope_parameters", params) if isinstance(params, dict) else ("rope_scaling", {})


def rope_scaling_from_hf(hf: dict[str, Any], where: str) -> Any:
    """config.json's ``rope_scaling`` / ``rope_parameters`` -> :class:`~llamalab.model.config.RopeScaling` (None
    for plain RoPE), read as transformers reads them: ``type`` for ``rope_type`` in old files, a top-level
    ``original_max_position_embeddings`` before the one inside (llama3, yarn), ``max_position_embeddings`` when
    there is none, and yarn's ``factor`` from the two when absent. ``dynamic`` keeps ``max_position_embeddings``
    as its original context (see :func:`max_seq_len_from_hf`). Keys the type does not read are ignored, as
    transformers ignores them, and named on stdout."""
    from llamalab.common import print0
    from llamalab.model.config import ROPE_FIELDS, ROPE_TYPES, ModelConfigError, RopeScaling

    name, d = _rope_source(hf)
    rope_type = d.get("rope_type", d.get("type")) or "default"
    if rope_type == "default":
        return None
    if rope_type not in ROPE_TYPES:
        raise LlamalabError(f"{where}: rope scaling type {rope_type!r} (field {name}.rope_type) is not supported; "
                            f"llamalab reads default, {', '.join(ROPE_TYPES)}")
    partial = d.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        raise LlamalabError(f"{where}: field partial_rotary_factor={partial!r} (partial rotary) is not supported")
    mpe = hf.get("max_position_embeddings", 2048)
    used = ROPE_FIELDS[rope_type]
    kw: dict[str, Any] = {k: d[k] if k in ("original_max_position_embeddings", "truncate") else _number(d[k])
                          for k in used if d.get(k) is not None}
    if rope_type == "dynamic":
        kw["original_max_position_embeddings"] = mpe
    elif "original_max_position_embeddings" in used:
        kw["original_max_position_embeddings"] = hf.get("original_max_position_embeddings",
                                                        d.get("original_max_position_embeddings", mpe))
    factor = d.get("factor")
    if factor is None and rope_type == "yarn" and isinstance(mpe, int) and isinstance(
            kw["original_max_position_embeddings"], int):
        factor = mpe / kw["original_max_position_embeddings"]
    if factor is None:
        raise LlamalabError(f"{where}: field {name}.factor is missing (rope_type {rope_type!r} needs it)")
    ignored = sorted(set(d) - set(used) - {"rope_type", "type", "factor", "rope_theta", "partial_rotary_factor"})
    if ignored:
        print0(f"{where}: field(s) {', '.join(f'{name}.{k}' for k in ignored)} not read by rope_type "
               f"{rope_type!r}; ignored, as transformers ignores them")
    try:
        return RopeScaling(rope_type, factor=_number(factor), **kw)
    except ModelConfigError as e:
        raise LlamalabError(f"{where}: {str(e).replace('model.rope_scaling.', f'field {name}.')}") from None


def max_seq_len_from_hf(hf: dict[str, Any], where: str) -> Any:
    """``max_position_embeddings``; times ``factor`` for ``dynamic`` RoPE scaling, whose point is to run past
    the context the model was trained at (HF sets no limit; llamalab's context is its KV cache size)."""
    mpe = hf.get("max_position_embeddings", 2048)
    name, d = _rope_source(hf)
    factor = d.get("factor")
    if d.get("rope_type", d.get("type")) == "dynamic" and isinstance(mpe, int) and not isinstance(mpe, bool) \
            and isinstance(factor, (int, float)) and not isinstance(factor, bool) and factor > 1:
        return int(mpe * factor)
    return mpe


def rope_scaling_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The config.json keys of ``cfg.rope_scaling``: ``rope_parameters`` (transformers 5) and ``rope_scaling``
    (transformers 4 and llama.cpp's converter) with HF's field names; for ``dynamic`` also
    ``max_position_embeddings`` = the original context. Empty for plain RoPE."""
    from llamalab.model.config import ROPE_FIELDS

    s = cfg.rope_scaling
    if s is None:
        return {}
    d: dict[str, Any] = {"rope_type": s.rope_type, "factor": s.factor}
    d.update({k: getattr(s, k) for k in ROPE_FIELDS[s.rope_type] if getattr(s, k) is not None})
    out: dict[str, Any] = {}
    if s.rope_type == "dynamic":
        out["max_position_embeddings"] = d.pop("original_max_position_embeddings")
    return {**out, "rope_scaling": dict(d), "rope_parameters": {**d, "rope_theta": cfg.rope_theta}}


# ----------------------------------------------------------------------------- weights


def _layer_map(i: int) -> dict[str, str]:
    hf, me = f"model.layers.{i}.", f"layers.{i}."
    return {
        f"{hf}self_attn.q_proj.weight": f"{me}attention.wq.weight",
        f"{hf}self_attn.k_proj.weight": f"{me}attention.wk.weight",
        f"{hf}self_attn.v_proj.weight": f"{me}attention.wv.weight",
        f"{hf}self_attn.o_proj.weight": f"{me}attention.wo.weight",
        f"{hf}mlp.gate_proj.weight": f"{me}feed_forward.w1.weight",
        f"{hf}mlp.down_proj.weight": f"{me}feed_forward.w2.weight",
        f"{hf}mlp.up_proj.weight": f"{me}feed_forward.w3.weight",
        f"{hf}input_layernorm.weight": f"{me}attention_norm.weight",
        f"{hf}post_attention_layernorm.weight": f"{me}ffn_norm.weight",
    }


def name_map(cfg: ModelConfig) -> dict[str, str]:
    """HF tensor name -> llamalab tensor name."""
    m = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight"}
    if not cfg.tie_embeddings:
        m["lm_head.weight"] = "output.weight"
    for i in range(cfg.n_layers):
        m.update(_layer_map(i))
    return m


def _weight_files(folder: Path) -> list[Path]:
    st = sorted(folder.glob("*.safetensors"))
    if st:
        return st
    pickled = sorted([*folder.glob("*.bin"), *folder.glob("*.pt"), *folder.glob("*.pth")])
    if pickled:
        raise LlamalabError(f"{folder}: only pickle weights found ({pickled[0].name}); llamalab never unpickles "
                            f"user files. Convert them to safetensors first (e.g. with transformers' "
                            f"save_pretrained(..., safe_serialization=True) in a trusted environment)")
    raise LlamalabError(f"{folder}: no *.safetensors weights found")


def read_hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in _weight_files(folder):
        try:
            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():
                    out[k] = st.get_tensor(k)
        except (SafetensorError, OSError) as e:
            raise LlamalabError(f"{f}: not a readable safetensors file ({e})") from None
    return out


def check_hf_weights(cfg: ModelConfig, shapes: dict[str, tuple[int, ...]], folder: Path, cfg_path: Path) -> None:
    """The safetensors headers against config.json (layers, names, shapes), before any weight is read."""
    shapes = {k: v for k, v in shapes.items() if not k.endswith("rotary_emb.inv_freq")}
    if cfg.tie_embeddings:
        shapes.pop("lm_head.weight", None)
    check_weights(cfg, shapes, str(folder), str(cfg_path), rename=name_map(cfg), names=HF_FIELDS)


def state_from_hf(hf_sd: dict[str, torch.Tensor], cfg: ModelConfig, where: str) -> dict[str, torch.Tensor]:
    names = name_map(cfg)
    hf_sd = {k: v for k, v in hf_sd.items() if not k.endswith("rotary_emb.inv_freq")}
    if cfg.tie_embeddings:
        hf_sd.pop("lm_head.weight", None)
    missing = sorted(set(names) - set(hf_sd))
    unexpected = sorted(set(hf_sd) - set(names))
    if missing or unexpected:
        raise LlamalabError(f"{where}: tensors do not match config.json: missing {missing[:4]}, "
                            f"unexpected {unexpected[:4]}")
    sd: dict[str, torch.Tensor] = {}
    for hf_name, ours in names.items():
        w = hf_sd[hf_name]
        if hf_name.endswith("q_proj.weight") or hf_name.endswith("k_proj.weight"):
            heads = cfg.n_heads if "q_proj" in hf_name else cfg.kv_heads
            want = (heads * cfg.head_dim, cfg.dim)
            if tuple(w.shape) != want:
                raise LlamalabError(f"{where}: tensor {hf_name} has shape {tuple(w.shape)}, config.json implies {want}")
            w = permute_from_hf(w, heads)
        sd[ours] = w
    return sd


def state_to_hf(model: Transformer) -> dict[str, torch.Tensor]:
    """Our weights under HF names; a reward model (``score`` head, no LM head) as ``LlamaForSequenceClassification``."""
    cfg = model.cfg
    ours = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    reward = REWARD_HEAD in ours
    if reward:
        out[REWARD_HEAD] = ours[REWARD_HEAD].contiguous()
    for hf_name, name in name_map(cfg).items():
        if reward and name == "output.weight":
            continue
        w = ours[name]
        if hf_name.endswith("q_proj.weight"):
            w = permute_to_hf(w, cfg.n_heads)
        elif hf_name.endswith("k_proj.weight"):
            w = permute_to_hf(w, cfg.kv_heads)
        out[hf_name] = w.contiguous()
    return out


# ----------------------------------------------------------------------------- folders


def load_hf(folder: str | Path, dtype: torch.dtype = torch.float32) -> Transformer:
    """Build a llamalab Transformer from a local HF LLaMA folder."""
    folder = Path(folder)
    cfg_path = folder / "config.json"
    cfg = config_from_hf(read_config_json(cfg_path, what="Hugging Face config"), where=str(cfg_path))
    files = _weight_files(folder)
    check_hf_weights(cfg, safetensors_shapes(files), folder, cfg_path)
    check_memory(cfg, sum(f.stat().st_size for f in files), str(folder))
    sd = state_from_hf(read_hf_tensors(folder), cfg, where=str(folder))
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    load_into(model, sd, where=str(folder))
    return model.to(dtype).eval()


def hf_extra(src: Path) -> dict[str, Any]:
    """The config.json keys an imported HF folder carries: where it came from and its Jinja chat template."""
    hf_cfg = read_config_json(src / "config.json", what="Hugging Face config")
    extra: dict[str, Any] = {"imported_from": {"format": "huggingface", "path": str(src.resolve()),
                                               "architectures": hf_cfg.get("architectures")}}
    chat = hf_chat_template_of(src)
    if chat is not None:
        extra["hf_chat_template"] = chat
    return extra


MAX_TEMPLATE_BYTES = 1 << 20  # a chat template is kilobytes


def hf_chat_template_of(src: Path) -> str | None:
    """A HF folder's chat template (Jinja), where transformers writes it: ``chat_template.jinja`` (transformers
    >= 4.50), ``chat_template.json`` (``{"chat_template": ...}``), else ``tokenizer_config.json``; None without one.
    A list of named templates (``[{"name", "template"}]``) gives its ``default``."""
    jinja = src / "chat_template.jinja"
    if jinja.is_file():
        if jinja.stat().st_size > MAX_TEMPLATE_BYTES:
            raise LlamalabError(f"{jinja}: {jinja.stat().st_size:,} bytes is too large for a chat template")
        try:
            return jinja.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise LlamalabError(f"{jinja}: not UTF-8 text") from None
    for name, what in (("chat_template.json", "chat template file"), ("tokenizer_config.json", "tokenizer config")):
        if (src / name).exists():
            chat = read_config_json(src / name, what=what).get("chat_template")
            if isinstance(chat, list):  # named templates
                chat = next((t.get("template") for t in chat if isinstance(t, dict) and t.get("name") == "default"),
                            None)
            if isinstance(chat, str):
                return chat
    return None


def hf_tokenizer(src: Path) -> Any:
    """A HF folder's tokenizer, its kind read from the content (SentencePiece tokenizer.model, tokenizer.json,
    tiktoken tokenizer.model), special tokens and BOS rule from tokenizer_config.json / config.json; None if
    the folder has no tokenizer (:func:`llamalab.tokenizer.load_folder_tokenizer`)."""
    from llamalab.tokenizer import load_folder_tokenizer

    return load_folder_tokenizer(src)


def import_hf(src: str | Path, dst: str | Path) -> Path:
    """HF folder -> llamalab model folder, with its tokenizer (SentencePiece tokenizer.model, or tokenizer.json
    with its special tokens, BOS rule and stop ids) written by :func:`llamalab.model.folder.save_tokenizer`."""
    src = Path(src)
    model = load_hf(src)
    return save_model(dst, model, extra=hf_extra(src), tokenizer=hf_tokenizer(src))


def _spm_tokenizer_files(dst: Path, tok: Any, chat_template: str | None, max_len: int) -> None:
    """A SentencePiece tokenizer as transformers' LlamaTokenizer reads it, BOS rule and special pieces its own."""
    write_spm_model(tok, dst)
    piece = {k: (tok.id_to_piece(i) if i >= 0 else None) for k, i in (("bos_token", tok.bos_id),
                                                                       ("eos_token", tok.eos_id),
                                                                       ("unk_token", tok.unk_id),
                                                                       ("pad_token", tok.pad_id))}
    extra = {"chat_template": chat_template} if chat_template else {}
    write_json_atomic(dst / "tokenizer_config.json", {**extra, "tokenizer_class": "LlamaTokenizer", **piece,
        "add_bos_token": bool(tok.add_bos), "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "legacy": True, "model_max_length": max_len, "sp_model_kwargs": {},
    })
    write_json_atomic(dst / "special_tokens_map.json", {k: v for k, v in piece.items() if v is not None})


def _ids_field(ids: list[int]) -> int | list[int] | None:
    """An ``eos_token_id``-style value: one id, several, or none."""
    return None if not ids else ids[0] if len(ids) == 1 else ids


def export_hf(model: Transformer, dst: str | Path, tok_path: str | Path | None = None,
              bos_id: int = 1, eos_id: int = 2, chat_template: str | None = None, tokenizer: Any = None) -> Path:
    """Write ``model`` as a HF folder that ``LlamaForCausalLM.from_pretrained`` loads unchanged.

    ``tokenizer`` (a loaded tokenizer of either kind; or ``tok_path``, a SentencePiece tokenizer.model) is
    written so that ``AutoTokenizer.from_pretrained`` encodes as llamalab does: byte-level BPE as
    ``tokenizer.json`` + ``tokenizer_config.json`` (:meth:`BPETokenizer.save`), SentencePiece as
    ``tokenizer.model`` + a LlamaTokenizer ``tokenizer_config.json``; its BOS rule is ``add_bos_token``, its
    special ids go into config.json and ``generation_config.json`` (``eos_token_id``: every stop id, Llama 3.1
    Instruct's three). ``chat_template`` (Jinja) goes into ``tokenizer_config.json`` for ``apply_chat_template``.
    """
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    if tokenizer is None and tok_path is not None:
        from llamalab.tokenizer import Tokenizer

        tokenizer = Tokenizer(tok_path)
    stops = [eos_id]
    pad = None
    if tokenizer is not None:
        bos_id, eos_id = tokenizer.bos_id, tokenizer.eos_id
        stops = list(getattr(tokenizer, "stop_ids", None) or ([eos_id] if eos_id >= 0 else []))
        pad = tokenizer.pad_id if tokenizer.pad_id >= 0 else None
    sd = state_to_hf(model)
    total = sum(t.numel() * t.element_size() for t in sd.values())
    if total <= MAX_SHARD_BYTES:
        save_safetensors(sd, dst / "model.safetensors", metadata={"format": "pt"})
    else:
        _save_sharded(sd, dst, total)
    bos = bos_id if bos_id is not None and bos_id >= 0 else None
    if REWARD_HEAD in sd:
        pad = reward_pad_id(tokenizer, stops)
    hf_cfg = config_to_hf(model.cfg, bos, _ids_field(stops), pad)
    if REWARD_HEAD in sd:
        hf_cfg.update({"architectures": [REWARD_ARCH], "num_labels": 1, "id2label": {"0": "LABEL_0"},
                       "label2id": {"LABEL_0": 0}, "problem_type": "regression"})
    write_json_atomic(dst / "config.json", hf_cfg)
    write_json_atomic(dst / "generation_config.json", {"bos_token_id": bos, "eos_token_id": _ids_field(stops),
                                                       **({"pad_token_id": pad} if pad is not None else {})})
    if getattr(tokenizer, "kind", None) == "bpe":
        tokenizer.save(dst, chat_template=chat_template, model_max_length=model.cfg.max_seq_len)
    elif tokenizer is not None:
        _spm_tokenizer_files(dst, tokenizer, chat_template, model.cfg.max_seq_len)
    return dst


def _save_sharded(sd: dict[str, torch.Tensor], dst: Path, total: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in sd.items():
        b = t.numel() * t.element_size()
        if size + b > MAX_SHARD_BYTES and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += b
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_safetensors(shard, dst / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    (dst / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def reward_pad_id(tokenizer: Any, stops: list[int]) -> int:
    """``pad_token_id`` of an exported reward model. ``LlamaForSequenceClassification`` scores the rightmost token
    that is not ``pad_token_id``, so the pad must never be a row's last real token (EOS, a turn closer): the
    tokenizer's pad when it is none of those, else its unk, else BOS (only ever first), else 0."""
    if tokenizer is None:
        return 0
    end = set(stops) | {tokenizer.eos_id}
    for i in (tokenizer.pad_id, getattr(tokenizer, "unk_id", -1), tokenizer.bos_id, 0):
        if i is not None and i >= 0 and i not in end:
            return i
    return 0


def export_folder(src: str | Path, dst: str | Path) -> Path:
    """llamalab model folder -> HF folder, with its tokenizer (any kind) and chat template; a reward model folder
    (``kind: reward``) -> ``LlamaForSequenceClassification`` (``num_labels`` 1)."""
    from llamalab.tokenizer import load_folder_tokenizer

    if read_config_json(Path(src) / "config.json").get("kind") == "reward":
        from llamalab.align.reward import load_reward_model

        rm, tok, meta = load_reward_model(src)
        return export_hf(rm, dst, chat_template=jinja_for(meta, tok), tokenizer=tok)
    model, meta = load_model(src)
    tok = load_folder_tokenizer(src)
    if tok is None:
        print0(f"hf: {src} has no tokenizer; the HF folder will hold none (AutoTokenizer cannot load it)")
    return export_hf(model, dst, chat_template=jinja_for(meta, tok), tokenizer=tok)


def jinja_for(meta: dict[str, Any], tokenizer: Any = None) -> str | None:
    """The folder's chat template as Jinja: ours translated when the folder names one (``chat_template``, what
    every llamalab stage renders with; with the tokenizer's BOS rule), else the source's own when imported
    (``hf_chat_template``, ``gguf_chat_template``), else None."""
    if meta.get("chat_template"):
        from llamalab.tokenizer.templates import hf_chat_template

        return hf_chat_template(meta["chat_template"], add_bos=bool(getattr(tokenizer, "add_bos", True)))
    for key in ("hf_chat_template", "gguf_chat_template"):
        if isinstance(meta.get(key), str) and meta[key].strip():
            return meta[key]
    return None
