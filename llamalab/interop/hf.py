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
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from llamalab.common import LlamalabError, read_json, write_json_atomic
from llamalab.model.config import ModelConfig
from llamalab.model.folder import load_into, load_model, save_model, tokenizer_path
from llamalab.model.transformer import Transformer

SUPPORTED_ARCHS = ("LlamaForCausalLM",)
MAX_SHARD_BYTES = 5 * 1024**3


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
    rope_type = (params.get("rope_type") or (scaling or {}).get("rope_type") or (scaling or {}).get("type")
                 or "default")
    if rope_type != "default":
        raise LlamalabError(f"{where}: rope scaling type {rope_type!r} is not supported (field rope_scaling / "
                            f"rope_parameters.rope_type); only plain RoPE")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def config_from_hf(hf: dict[str, Any], where: str = "config.json") -> ModelConfig:
    archs = hf.get("architectures") or []
    if hf.get("model_type") != "llama" or not any(a in SUPPORTED_ARCHS for a in archs):
        raise LlamalabError(f"{where}: unsupported architecture {archs or hf.get('model_type')!r} "
                            f"(field 'architectures'); llamalab imports {', '.join(SUPPORTED_ARCHS)}")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise LlamalabError(f"{where}: field {flag}=true is not supported (LLaMA has no biases)")
    if hf.get("hidden_act", "silu") != "silu":
        raise LlamalabError(f"{where}: field hidden_act={hf['hidden_act']!r}; only silu (SwiGLU) is supported")
    try:
        dim, n_heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        head_dim = hf.get("head_dim")
        if head_dim is not None and int(head_dim) != dim // n_heads:
            raise LlamalabError(f"{where}: field head_dim={head_dim} differs from hidden_size/num_attention_heads")
        return ModelConfig(
            dim=dim, n_layers=int(hf["num_hidden_layers"]), n_heads=n_heads,
            n_kv_heads=int(hf.get("num_key_value_heads") or n_heads), vocab_size=int(hf["vocab_size"]),
            hidden_dim=int(hf["intermediate_size"]), norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=_rope_theta(hf, where), max_seq_len=int(hf.get("max_position_embeddings", 2048)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        )
    except KeyError as e:
        raise LlamalabError(f"{where}: missing field {e.args[0]!r}") from None


def config_to_hf(cfg: ModelConfig, bos_id: int = 1, eos_id: int = 2, pad_id: int | None = None) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_hidden_dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "max_position_embeddings": cfg.max_seq_len, "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "initializer_range": 0.02,
        "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id, "torch_dtype": "float32",
        "use_cache": True,
    }


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
    cfg = model.cfg
    ours = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    for hf_name, name in name_map(cfg).items():
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
    cfg = config_from_hf(read_json(cfg_path, what="Hugging Face config"), where=str(cfg_path))
    sd = state_from_hf(read_hf_tensors(folder), cfg, where=str(folder))
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    load_into(model, sd, where=str(folder))
    return model.to(dtype).eval()


def hf_extra(src: Path) -> dict[str, Any]:
    """The config.json keys an imported HF folder carries: where it came from and its Jinja chat template."""
    hf_cfg = read_json(src / "config.json")
    extra: dict[str, Any] = {"imported_from": {"format": "huggingface", "path": str(src.resolve()),
                                               "architectures": hf_cfg.get("architectures")}}
    tcfg = src / "tokenizer_config.json"
    if tcfg.exists():
        chat = read_json(tcfg).get("chat_template")
        if isinstance(chat, str):
            extra["hf_chat_template"] = chat
    return extra


def hf_tokenizer(src: Path) -> Any:
    """A HF folder's tokenizer: tokenizer.model (SentencePiece), else tokenizer.json (BPE); None if neither.

    tokenizer.json has no notion of BOS/EOS for ``encode(bos=True)``; they come from config.json's
    ``bos_token_id``/``eos_token_id`` (HF keeps them there).
    """
    if (src / "tokenizer.model").exists():
        from llamalab.tokenizer import Tokenizer

        return Tokenizer(src / "tokenizer.model")
    path = src / "tokenizer.json"
    if not path.exists():
        return None
    from llamalab.tokenizer import BPETokenizer

    hf_cfg = read_json(src / "config.json")
    spec = read_json(path, what="tokenizer.json")
    ids = {}
    for ours, theirs in (("bos_id", "bos_token_id"), ("eos_id", "eos_token_id")):
        v = hf_cfg.get(theirs)
        v = v[0] if isinstance(v, list) and v else v  # Llama 3 lists several EOS ids; the first is the canonical one
        if isinstance(v, int):
            ids[ours] = v
    return BPETokenizer.from_spec({**spec, "llamalab": ids})


def import_hf(src: str | Path, dst: str | Path) -> Path:
    """HF folder -> llamalab model folder (tokenizer.model copied when present)."""
    src = Path(src)
    model = load_hf(src)
    tok = src / "tokenizer.model"
    return save_model(dst, model, tokenizer_path=tok if tok.exists() else None, extra=hf_extra(src))


def _tokenizer_files(dst: Path, tok_path: Path | None, bos: int, eos: int, chat_template: str | None = None) -> None:
    if tok_path is None:
        return
    shutil.copyfile(tok_path, dst / "tokenizer.model")
    extra = {"chat_template": chat_template} if chat_template else {}
    write_json_atomic(dst / "tokenizer_config.json", {**extra,
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": None, "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "legacy": True, "model_max_length": 1000000000000000019884624838656, "sp_model_kwargs": {},
    })
    write_json_atomic(dst / "special_tokens_map.json", {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})


def export_hf(model: Transformer, dst: str | Path, tok_path: str | Path | None = None,
              bos_id: int = 1, eos_id: int = 2, chat_template: str | None = None) -> Path:
    """Write ``model`` as a HF folder that ``LlamaForCausalLM.from_pretrained`` loads unchanged.

    ``chat_template`` (Jinja) goes into ``tokenizer_config.json`` for ``apply_chat_template``.
    """
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    sd = state_to_hf(model)
    total = sum(t.numel() * t.element_size() for t in sd.values())
    if total <= MAX_SHARD_BYTES:
        save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    else:
        _save_sharded(sd, dst, total)
    write_json_atomic(dst / "config.json", config_to_hf(model.cfg, bos_id, eos_id))
    write_json_atomic(dst / "generation_config.json", {"bos_token_id": bos_id, "eos_token_id": eos_id})
    _tokenizer_files(dst, Path(tok_path) if tok_path else None, bos_id, eos_id, chat_template)
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
        save_file(shard, str(dst / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    (dst / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def export_folder(src: str | Path, dst: str | Path) -> Path:
    """llamalab model folder -> HF folder."""
    model, meta = load_model(src)
    tok = tokenizer_path(src)
    bos, eos = 1, 2
    if tok is not None:
        from llamalab.tokenizer import Tokenizer

        t = Tokenizer(tok)
        bos, eos = t.bos_id, t.eos_id
    return export_hf(model, dst, tok, bos, eos, chat_template=_jinja_for(meta))


def _jinja_for(meta: dict) -> str | None:
    """The folder's chat template as Jinja: the original HF one when imported, else ours translated."""
    if isinstance(meta.get("hf_chat_template"), str):
        return meta["hf_chat_template"]
    if meta.get("chat_template"):
        from llamalab.tokenizer.templates import hf_chat_template

        return hf_chat_template(meta["chat_template"])
    return None
