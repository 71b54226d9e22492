"""Distributed and memory-saving training on CPU (2 gloo processes): DDP, FSDP2 and tensor
parallelism train like one process with the same global batch; checkpoints re-shard across world
sizes (2 -> 1 and 1 -> 2) and training continues with the same losses; activation checkpointing
changes memory, not results; fp16 loss scaling skips overflowed steps; launch and batch mistakes
give clear errors."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from llamalab.commands.pretrain import main as pretrain
from llamalab.common import LlamalabError
from tests.conftest import run_gloo
from tests.train.conftest import small_config

# micro-batch 2 of a global batch of 8 sequences: 4 micro-steps on 1 process, 2 per rank on 2, so
# gradient accumulation (and skipping the sync between micro-steps) is exercised both ways.
RUN = dict(steps=4, micro_batch_size=2, checkpoint_interval=2, eval_interval=0, optim={"lr": 3e-3, "warmup_steps": 1})
LOSS_TOL = 2e-5  # fp32: different summation orders across ranks
# Adam divides by sqrt(v): an entry whose gradient is pure rounding noise (a vocabulary row the batch
# hardly touches) moves by up to ~lr either way, so single entries may differ by 1e-4..1e-3 between
# summation orders. Compared per tensor instead: nearly every entry within 1e-4 and the difference's
# norm within 1e-4 of the tensor's. A lost or stale optimizer state, a skipped step or a wrong learning
# rate moves every entry by ~lr = 3e-3 (a relative difference ~0.1); a wrong gradient scale shows in
# the gradient norms.
WEIGHT_TOL = 1e-4


def _pretrain_worker(rank: int, world: int, data: str, run_dir: str, kw: dict) -> None:
    pretrain(small_config(data, run_dir, **kw))


def losses(run, key="loss"):
    return {r["step"]: r[key] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def weights(run, step):
    return load_file(str(run / f"checkpoints/step_{step:06d}/model/model.safetensors"))


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        diff = (a[k] - b[k]).abs()
        assert (diff <= WEIGHT_TOL).float().mean() >= 0.999, (k, diff.max())
        assert float(diff.norm()) <= WEIGHT_TOL * float(a[k].norm()), (k, float(diff.norm()), float(a[k].norm()))


def assert_same_losses(a, b, steps):
    """Same losses, and same gradient norms: AdamW is blind to a constant factor on the gradients
    (a wrong world-size normalisation), the logged pre-clip norm is not."""
    la, lb = losses(a), losses(b)
    ga, gb = losses(a, "grad_norm"), losses(b, "grad_norm")
    for s in steps:
        assert lb[s] == pytest.approx(la[s], abs=LOSS_TOL), (s, la, lb)
        assert gb[s] == pytest.approx(ga[s], rel=1e-4), (s, ga, gb)


@pytest.fixture(scope="module")
def single(botchan_shards, tmp_path_factory):
    """The reference: one process, the same global batch, 4 steps (checkpoints at 2 and 4)."""
    run = tmp_path_factory.mktemp("single") / "run"
    pretrain(small_config(botchan_shards, run, **RUN))
    return run


@pytest.fixture(scope="module")
def fsdp2(botchan_shards, tmp_path_factory):
    run = tmp_path_factory.mktemp("fsdp") / "run"
    run_gloo(_pretrain_worker, 2, str(botchan_shards), str(run), {**RUN, "parallel": {"strategy": "fsdp"}})
    return run


def test_ddp_two_processes_match_one(botchan_shards, single, tmp_path):
    run = tmp_path / "ddp"
    run_gloo(_pretrain_worker, 2, str(botchan_shards), str(run), {**RUN, "parallel": {"strategy": "ddp"}})
    assert_same_losses(single, run, range(1, 5))
    assert_same_weights(weights(single, 4), weights(run, 4))
    meta = json.loads((run / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["strategy"] == "ddp" and meta["plan"]["accum"] == 2


def test_fsdp_two_processes_match_one(single, fsdp2):
    assert_same_losses(single, fsdp2, range(1, 5))
    assert_same_weights(weights(single, 4), weights(fsdp2, 4))  # gathered from the shards into model/
    ckpt = fsdp2 / "checkpoints/step_000004"
    assert (ckpt / "dcp" / ".metadata").exists() and not (ckpt / "optimizer.safetensors").exists()
    sums = json.loads((ckpt / "checksums.json").read_text())
    assert any(k.startswith("dcp/") and k.endswith(".distcp") for k in sums)  # shards are verified too


def test_fsdp_checkpoint_resumes_with_one_process(botchan_shards, single, fsdp2, tmp_path):
    run = tmp_path / "resized"
    shutil.copytree(fsdp2, run)
    shutil.rmtree(run / "checkpoints/step_000004")  # resume from the sharded step-2 checkpoint
    pretrain(small_config(botchan_shards, run, resume=True, **RUN))
    assert_same_losses(single, run, [3, 4])
    assert_same_weights(weights(single, 4), weights(run, 4))
    restart = [json.loads(x) for x in (run / "logbook.jsonl").read_text().splitlines() if '"restart"' in x]
    assert restart and restart[-1]["step"] == 2
    meta = json.loads((run / "meta.json").read_text())  # the record shows the resize
    assert (meta["world_size"], meta["history"][-1]["world_size"], meta["history"][-1]["strategy"]) == (1, 2, "fsdp")


def test_single_process_checkpoint_resumes_sharded(botchan_shards, single, tmp_path):
    run = tmp_path / "grown"
    shutil.copytree(single, run)
    shutil.rmtree(run / "checkpoints/step_000004")
    run_gloo(_pretrain_worker, 2, str(botchan_shards), str(run),
             {**RUN, "resume": True, "parallel": {"strategy": "fsdp"}})
    assert_same_losses(single, run, [3, 4])
    assert_same_weights(weights(single, 4), weights(run, 4))


def test_tensor_parallel_matches_one_process_and_resumes_with_one(botchan_shards, single, tmp_path):
    run = tmp_path / "tp"
    run_gloo(_pretrain_worker, 2, str(botchan_shards), str(run), {**RUN, "parallel": {"strategy": "tp"}})
    assert_same_losses(single, run, range(1, 5))
    assert_same_weights(weights(single, 4), weights(run, 4))
    meta = json.loads((run / "meta.json").read_text())
    assert meta["strategy"] == "tp" and meta["plan"]["accum"] == 4  # both ranks read the whole batch
    shutil.rmtree(run / "checkpoints/step_000004")
    pretrain(small_config(botchan_shards, run, resume=True, **RUN))  # TP shards -> one process
    assert_same_losses(single, run, [3, 4])


def _sequence_parallel_worker(rank: int, world: int) -> None:
    from llamalab.model import ModelConfig
    from llamalab.model.transformer import Transformer
    from llamalab.train.tensor_parallel import apply_tensor_parallel

    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, multiple_of=16, max_seq_len=16)
    ref = Transformer(cfg)
    ref.init_weights(seed=5)
    tp = Transformer(cfg)
    tp.load_state_dict(ref.state_dict())
    apply_tensor_parallel(tp, torch.device("cpu"), sequence_parallel=True)
    seen = []
    tp.layers[1].register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    x = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(tp(x), ref(x), atol=1e-5, rtol=1e-4)
    assert seen == [(2, 8, 64)]  # between blocks each rank holds half of the sequence


def test_sequence_parallel_splits_the_residual_stream_not_the_result(botchan_shards, single, tmp_path):
    run_gloo(_sequence_parallel_worker, 2)
    run = tmp_path / "sp"
    run_gloo(_pretrain_worker, 2, str(botchan_shards), str(run),
             {**RUN, "parallel": {"strategy": "tp", "sequence_parallel": True}})
    assert_same_losses(single, run, range(1, 5))
    assert_same_weights(weights(single, 4), weights(run, 4))


def test_a_corrupt_shard_falls_back_to_the_previous_checkpoint(fsdp2, tmp_path):
    from llamalab.train.checkpoint import latest_good_checkpoint

    run = tmp_path / "corrupt"
    shutil.copytree(fsdp2, run)
    shard = sorted((run / "checkpoints/step_000004/dcp").glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:-7])
    assert latest_good_checkpoint(run / "checkpoints").name == "step_000002"


# ----------------------------------------------------------------------------- memory savers


def _loss_and_saved_bytes(model, tokens):
    """Loss, gradients, and the bytes autograd keeps for backward (distinct storages)."""
    seen: dict[int, int] = {}

    def pack(t):
        if t.device.type != "meta":
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    loss = loss.detach()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return loss.item(), grads, sum(seen.values())


@pytest.mark.parametrize("mode", ["full", "every_k"])
def test_activation_checkpointing_changes_memory_not_results(tiny_config, mode):
    from llamalab.model.transformer import Transformer
    from llamalab.train.distributed import apply_activation_checkpointing

    cfg = tiny_config
    cfg.n_layers = 4
    plain = Transformer(cfg)
    plain.init_weights(seed=3)
    ac = Transformer(cfg)
    ac.load_state_dict(plain.state_dict())
    assert apply_activation_checkpointing(ac, mode, every=2) == (4 if mode == "full" else 2)
    tokens = torch.randint(0, cfg.vocab_size, (4, 33), generator=torch.Generator().manual_seed(0))
    loss_a, grads_a, bytes_a = _loss_and_saved_bytes(plain, tokens)
    loss_b, grads_b, bytes_b = _loss_and_saved_bytes(ac, tokens)
    assert loss_a == loss_b
    for n in grads_a:
        torch.testing.assert_close(grads_a[n], grads_b[n], atol=1e-6, rtol=1e-5, msg=lambda m: f"{n}: {m}")
    # full: only block inputs, the head and the loss stay; every_k: about half the blocks recompute
    assert bytes_b < (0.5 if mode == "full" else 0.8) * bytes_a, (bytes_a, bytes_b)


def test_fp16_loss_scaling_skips_overflowed_steps(tiny_config):
    from llamalab.model.transformer import Transformer
    from llamalab.train.step import clip_and_step, forward_backward

    model = Transformer(tiny_config)
    model.init_weights(seed=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24, growth_interval=2)  # fp16 overflows at 2^24
    tokens = torch.randint(0, tiny_config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    micro = [(tokens[:, :-1], tokens[:, 1:])]
    fp16 = lambda: torch.autocast("cpu", dtype=torch.float16)  # noqa: E731
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def step() -> float:
        res = forward_backward(model, micro, fp16, scaler=scaler)
        assert res.loss == res.loss  # the loss itself stays finite: only the scaled gradients overflow
        return clip_and_step(model, opt, 1.0, scaler)

    assert not math.isfinite(step()) and scaler.get_scale() == 2.0**23  # overflow: skipped, scale halved
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    norms, scales = [], []
    for _ in range(30):
        norms.append(step())
        scales.append(scaler.get_scale())
    first_ok = next(i for i, n in enumerate(norms) if math.isfinite(n))
    assert scales[first_ok] < 2.0**20  # it took many halvings to fit in fp16 ...
    assert not all(torch.equal(before[n], p) for n, p in model.named_parameters())  # ... then it trained
    assert max(scales[first_ok:]) > scales[first_ok]  # and the scale grows again after clean steps


# ----------------------------------------------------------------------------- errors


def test_global_batch_not_divisible_is_a_clear_error(botchan_shards, tmp_path):
    from llamalab.data.shards import TokenDataset
    from llamalab.train.setup import build_model_config, make_plan

    cfg = small_config(botchan_shards, tmp_path / "r", global_batch_tokens=64 * 6, micro_batch_size=2)
    train = TokenDataset.open(botchan_shards, "train", 64)
    model_cfg = build_model_config(cfg.preset, cfg.model_overrides, train.manifest["vocab_size"])
    batch = dict(preset=cfg.preset, global_batch_tokens=cfg.global_batch_tokens,
                 micro_batch_size=cfg.micro_batch_size, steps=cfg.steps, optim=cfg.optim)
    assert make_plan(train, model_cfg, 1, **batch).accum == 3
    with pytest.raises(LlamalabError, match=r"6 sequences .* world size 2 x micro_batch_size 2"):
        make_plan(train, model_cfg, 2, **batch)


def test_launch_without_master_addr_is_a_clear_error(botchan_shards, tmp_path, monkeypatch):
    for k in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(LlamalabError, match="MASTER_ADDR, MASTER_PORT not set: launch with torchrun"):
        pretrain(small_config(botchan_shards, tmp_path / "r"))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(LlamalabError, match="RANK=5 .* out of range for WORLD_SIZE=2"):
        pretrain(small_config(botchan_shards, tmp_path / "r"))


def test_strategy_none_with_several_processes_is_an_error():
    from llamalab.train.distributed import ParallelConfig, resolve_strategy

    assert resolve_strategy(ParallelConfig("auto"), 2) == "ddp"
    assert resolve_strategy(ParallelConfig("fsdp"), 1) == "none"
    with pytest.raises(LlamalabError, match="diverging"):
        resolve_strategy(ParallelConfig("none"), 2)
    with pytest.raises(LlamalabError, match="strategy must be"):
        resolve_strategy(ParallelConfig("zero3"), 2)


# ----------------------------------------------------------------------------- fused loss head


def test_fused_cross_entropy_matches_the_plain_loss_and_gradients(tiny_config):
    from llamalab.model.transformer import Transformer
    from llamalab.train.fused_ce import FusedHead, install_fused_head, linear_cross_entropy_sum
    from llamalab.train.step import IGNORE_INDEX, model_loss_sum, token_loss_sum

    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 11, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g, requires_grad=True)
    t = torch.randint(0, 50, (3, 11), generator=g)
    t[0, :4] = IGNORE_INDEX
    ref = torch.nn.functional.cross_entropy((h @ w.t()).flatten(0, 1), t.flatten(), reduction="sum")
    gh, gw = torch.autograd.grad(2 * ref, (h, w))
    fused = linear_cross_entropy_sum(h, w, t, chunk_rows=7)  # 33 rows: uneven chunks, one all-ignored part
    fh, fw = torch.autograd.grad(2 * fused, (h, w))
    torch.testing.assert_close(fused, ref)
    torch.testing.assert_close(fh, gh)
    torch.testing.assert_close(fw, gw)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy_sum(h, w, t, chunk_rows=7), ref.detach())

    plain = Transformer(tiny_config)
    plain.init_weights(seed=2)
    fast = Transformer(tiny_config)
    fast.load_state_dict(plain.state_dict())
    assert install_fused_head(fast) and isinstance(fast.output, FusedHead)
    assert fast.output.weight is dict(fast.named_parameters())["output.weight"]  # same parameter, same name
    x = torch.randint(0, tiny_config.vocab_size, (2, 9), generator=g)
    y = torch.randint(0, tiny_config.vocab_size, (2, 9), generator=g)
    torch.testing.assert_close(fast(x), plain(x))  # unarmed: an ordinary linear head
    model_loss_sum(fast, x, y).backward()
    token_loss_sum(plain(x), y).backward()
    for (n, p), q in zip(plain.named_parameters(), fast.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-4, msg=lambda m: f"{n}: {m}")


def test_resume_keeps_this_runs_optimizer_kernel(tiny_config, tmp_path):
    """A checkpoint from a run with plain AdamW (e.g. fp16 + FSDP) resumed by one with fused AdamW
    under a GradScaler: loading must not hand the fused optimizer ``fused=False`` (it then fails)."""
    from llamalab.model.transformer import Transformer
    from llamalab.train.checkpoint import TrainState, load_checkpoint, save_checkpoint
    from llamalab.train.step import clip_and_step, forward_backward

    model = Transformer(tiny_config)
    x = torch.randint(0, tiny_config.vocab_size, (2, 9))
    plain = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=False)
    forward_backward(model, [(x, x)])
    clip_and_step(model, plain, 1.0)
    path = save_checkpoint(tmp_path, model, plain, TrainState(step=1), {})
    fused = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    load_checkpoint(path, model, fused)
    assert all(g["fused"] for g in fused.param_groups)
    scaler = torch.amp.GradScaler("cpu")
    forward_backward(model, [(x, x)], scaler=scaler)
    assert math.isfinite(clip_and_step(model, fused, 1.0, scaler))
