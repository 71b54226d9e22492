"""LoRA: only adapters train; merged weights give the same logits; adapters save and load alone."""

from __future__ import annotations

import pytest
import torch

from llamalab.common import LlamalabError
from llamalab.finetune.lora import (
    LoRAConfig,
    apply_lora,
    load_adapter,
    merge_lora,
    save_adapter,
)
from llamalab.model import Transformer
from llamalab.train.optim import OptimConfig, build_optimizer


def _pair(cfg, lora: LoRAConfig):
    torch.manual_seed(0)
    base = Transformer(cfg).eval()
    model = Transformer(cfg)
    model.load_state_dict(base.state_dict())
    n = apply_lora(model, lora)
    return base, model, n


def test_only_adapters_train(tiny_config):
    lora = LoRAConfig(rank=4, alpha=8, dropout=0.0, targets=["wq", "wv", "w2"])
    base, model, n = _pair(tiny_config, lora)
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(k.endswith((".lora_A", ".lora_B")) for k in trainable)
    d, hd = tiny_config.dim, tiny_config.head_dim
    per_layer = 4 * (d + tiny_config.n_heads * hd) + 4 * (d + tiny_config.kv_heads * hd) + 4 * (
        tiny_config.ffn_hidden_dim + d)
    assert n == per_layer * tiny_config.n_layers
    x = torch.randint(0, tiny_config.vocab_size, (2, 16))
    with torch.no_grad():  # B starts at zero: the adapted model is the base model
        torch.testing.assert_close(model.eval()(x), base(x))
    model.train()
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1), 1e-2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {k for k in after if ".lora_" in k}


def _train_a_bit(model, cfg, steps=3):
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    for _ in range(steps):
        torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def test_merged_logits_equal_base_plus_adapter(tiny_config):
    lora = LoRAConfig(rank=8, alpha=16, dropout=0.1, targets=["wq", "wk", "wv", "wo", "w1", "w2", "w3"])
    base, model, _ = _pair(tiny_config, lora)
    _train_a_bit(model, tiny_config)
    x = torch.randint(0, tiny_config.vocab_size, (2, 20))
    with torch.no_grad():
        adapted = model(x)
        assert (adapted - base(x)).abs().max() > 1e-3  # the adapter does something
        merge_lora(model)
        merged = model(x)
    assert not any(".lora_" in k for k in model.state_dict())
    assert set(model.state_dict()) == set(base.state_dict())
    torch.testing.assert_close(merged, adapted, atol=1e-4, rtol=1e-4)


def test_adapter_saves_and_loads_alone(tmp_path, tiny_config):
    lora = LoRAConfig(rank=2, alpha=4, dropout=0.0, targets=["wq", "wv"])
    base, model, _ = _pair(tiny_config, lora)
    _train_a_bit(model, tiny_config)
    save_adapter(tmp_path / "ad", model, lora, {"weights_sha256": "abc"})
    sizes = {p.name: p.stat().st_size for p in (tmp_path / "ad").iterdir()}
    assert set(sizes) == {"adapter_model.safetensors", "adapter_config.json"}
    fresh = Transformer(tiny_config)
    fresh.load_state_dict(base.state_dict())
    got = load_adapter(tmp_path / "ad", fresh, base_sha256="abc")
    assert got.rank == 2 and got.targets == ["wq", "wv"]
    x = torch.randint(0, tiny_config.vocab_size, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), model(x))
    with pytest.raises(LlamalabError, match="different base"):
        load_adapter(tmp_path / "ad", Transformer(tiny_config), base_sha256="def")


def test_tied_output_is_refused(tiny_config):
    tiny_config.tie_embeddings = True
    with pytest.raises(LlamalabError, match="tied"):
        apply_lora(Transformer(tiny_config), LoRAConfig(rank=2, targets=["wq", "output"]))
    with pytest.raises(LlamalabError, match="unknown"):
        LoRAConfig(rank=2, targets=["q_proj"]).validate()
