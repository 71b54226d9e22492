"""PPO (llamalab ppo): GAE and the clipped losses against hand computations, the reward rising with the KL to the
reference bounded (and unbounded without the penalty), LoRA training only adapters and the value head, resume ==
straight run, the sampler against a plain full-forward sampler."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llamalab.align.ppo import (
    PPOBatch,
    PPOConfig,
    PPOLoss,
    adapt_kl,
    combine_scores,
    gae,
    masked_whiten,
    running_whiten,
    sample_answers,
    token_rewards,
    update_running,
)
from llamalab.common import LlamalabError
from llamalab.inference.sampling import SamplingParams
from tests.align.conftest import synthetic_pairs, write_jsonl

HERE = "tests.align.test_ppo"


def letter_share(prompts, answers):
    """A scripted reward: the share of an answer's letters that are 'e' (dense, so a tiny model learns it fast)."""
    out = []
    for a in answers:
        letters = [c for c in a.lower() if c.isalpha()]
        out.append(sum(c == "e" for c in letters) / max(len(letters), 1))
    return out


def bad_count(prompts, answers):
    return [0.0] * (len(answers) + 1)


# ----------------------------------------------------------------------------- hand computations


def test_gae_equals_hand_computation():
    # one row: 2 prompt positions then 3 answer positions (t = 1, 2, 3 are masked), then padding
    mask = torch.tensor([[False, True, True, True, False, False]])
    rewards = torch.tensor([[9.0, 0.1, -0.2, 1.0, 7.0, 7.0]])  # outside the mask: must be ignored
    values = torch.tensor([[5.0, 0.5, 0.4, 0.3, 3.0, 3.0]])
    gamma, lam = 0.9, 0.8
    # by hand, backwards from the last answer token (V after it = 0)
    d3 = 1.0 + gamma * 0.0 - 0.3
    d2 = -0.2 + gamma * 0.3 - 0.4
    d1 = 0.1 + gamma * 0.4 - 0.5
    a3 = d3
    a2 = d2 + gamma * lam * a3
    a1 = d1 + gamma * lam * a2
    adv, ret = gae(rewards, values, mask, gamma, lam)
    assert torch.allclose(adv, torch.tensor([[0.0, a1, a2, a3, 0.0, 0.0]]), atol=1e-6)
    assert torch.allclose(ret, torch.tensor([[0.0, a1 + 0.5, a2 + 0.4, a3 + 0.3, 0.0, 0.0]]), atol=1e-6)
    # gamma = lambda = 1 (Llama 2's gamma): the advantage is the sum of the rewards to go minus the value
    adv1, _ = gae(rewards, values, mask, 1.0, 1.0)
    assert torch.allclose(adv1[0, 1:4], torch.tensor([0.9 - 0.5, 0.8 - 0.4, 1.0 - 0.3]), atol=1e-6)


def test_token_rewards_put_the_score_on_the_last_answer_token():
    mask = torch.tensor([[False, True, True, False], [True, True, True, False]])
    logp = torch.tensor([[0.0, -1.0, -2.0, 0.0], [-1.0, -1.0, -1.0, 0.0]])
    ref = torch.tensor([[0.0, -1.5, -1.0, 0.0], [-1.0, -2.0, -0.5, 0.0]])
    r = token_rewards(logp, ref, torch.tensor([2.0, -1.0]), mask, kl_coef=0.1)
    want = torch.tensor([[0.0, -0.1 * 0.5, -0.1 * -1.0 + 2.0, 0.0], [0.0, -0.1 * 1.0, -0.1 * -0.5 - 1.0, 0.0]])
    assert torch.allclose(r, want, atol=1e-6)


class Fixed(torch.nn.Module):
    """A stand-in model returning fixed logits and values (and a parameter so the loss has a gradient)."""

    def __init__(self, logits: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.logits = torch.nn.Parameter(logits.clone())
        self.values = torch.nn.Parameter(values.clone())

    def forward(self, tokens):
        return self.logits, self.values


def test_clipped_losses_equal_hand_computation():
    # vocab 2, one row of 3 tokens: actions tokens[1], tokens[2] taken at positions 0 and 1
    tokens = torch.tensor([[0, 1, 0]])
    logits = torch.tensor([[[0.0, math.log(3.0)], [math.log(4.0), 0.0], [0.0, 0.0]]])
    new_lp = [math.log(3 / 4), math.log(4 / 5)]  # p(token 1 | pos 0) = 3/4, p(token 0 | pos 1) = 4/5
    old_lp = [math.log(0.5), math.log(0.75)]  # ratios 1.5 (clipped to 1.2) and 1.0667 (inside the clip)
    adv = [1.0, -2.0]
    old_v, ret, v = [0.0, 1.0], [1.0, 0.0], [0.5, 1.5]
    mask = torch.tensor([[True, True, False]])
    pad = lambda xs: torch.tensor([xs + [0.0]])  # noqa: E731
    b = PPOBatch(tokens, mask, pad(old_lp), pad(old_v), pad(adv), pad(ret), {"score": 0.25})
    loss, stats = PPOLoss(clip=0.2, clip_value=0.2, vf_coef=0.1)(Fixed(logits, pad(v)), b)
    r = [math.exp(n - o) for n, o in zip(new_lp, old_lp)]
    # policy: max(-A r, -A clip(r)): token 0: max(-1.5, -1.2) = -1.2; token 1: max(2 r1, 2 r1) = 2 r1
    pg = [-1.2, 2.0 * r[1]]
    # value: 0.5 max((v - R)^2, (clip(v, old_v +- 0.2) - R)^2): token 0: clipped 0.2 -> max(0.25, 0.64);
    # token 1: clipped 1.2 -> max(2.25, 1.44)
    vf = [0.5 * 0.64, 0.5 * 2.25]
    assert abs(float(loss.detach()) - (sum(pg) + 0.1 * sum(vf))) < 1e-5
    assert abs(float(stats["policy_loss"]) - sum(pg)) < 1e-5
    assert abs(float(stats["value_loss"]) - sum(vf)) < 1e-5
    assert float(stats["clip_frac"]) == 1.0  # only token 0 hit the clip
    assert float(stats["value_clip_frac"]) == 2.0
    k3 = sum((x - 1) - math.log(x) for x in r)
    assert abs(float(stats["approx_kl"]) - k3) < 1e-5
    ent = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)) - (0.8 * math.log(0.8) + 0.2 * math.log(0.2))
    assert abs(float(stats["entropy"]) - ent) < 1e-5
    assert abs(float(stats["score"]) - 0.25 * 2) < 1e-6  # a rollout constant, times the units (averaged later)
    assert b.units() == 2


def test_whitening_and_running_statistics():
    stats = torch.zeros(3, dtype=torch.float64)
    a, b = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, -4.0])
    update_running(stats, a)
    update_running(stats, b)
    both = torch.cat([a, b]).double()
    assert abs(float(stats[0]) - 5) < 1e-12 and abs(float(stats[1]) - float(both.mean())) < 1e-9
    assert abs(float(stats[2]) / 5 - float(both.var(unbiased=False))) < 1e-9
    w = running_whiten(stats, both)
    assert abs(float(w.mean())) < 1e-9 and abs(float(w.std(unbiased=False)) - 1) < 1e-6
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, -100.0]])
    m = torch.tensor([[True, True, False], [True, True, False]])
    wx = masked_whiten(x, m)
    assert float(wx[0, 2]) == 0 and abs(float(wx[m].mean())) < 1e-6 and abs(float(wx[m].std(unbiased=False)) - 1) < 1e-3
    assert adapt_kl(0.1, kl=2.0, target=1.0, n=100, horizon=1000) == pytest.approx(0.1 * (1 + 0.2 * 0.1))
    assert adapt_kl(0.1, kl=0.9, target=1.0, n=100, horizon=1000) == pytest.approx(0.1 * (1 - 0.1 * 0.1))


def test_tied_policy_checkpoints_and_loads(tmp_path, tiny_config):
    """A policy with tied embeddings: the trainer's checkpoint writes the PPO model (safetensors refuses aliased
    tensors, so the tied head is left out) and loads it back, ties intact, buffers included."""
    from llamalab.align.ppo import PPOLoRAConfig, build_ppo_model
    from llamalab.model import Transformer
    from llamalab.model.folder import load_into, model_state_for_save, save_safetensors

    tiny_config.tie_embeddings = True
    torch.manual_seed(0)
    model, n = build_ppo_model(Transformer(tiny_config), PPOLoRAConfig(), 0.05)
    model.score_stats.copy_(torch.tensor([3.0, 0.5, 2.0], dtype=torch.float64))
    save_safetensors(model_state_for_save(model), tmp_path / "m.safetensors")
    torch.manual_seed(1)
    again, _ = build_ppo_model(Transformer(tiny_config), PPOLoRAConfig(), 0.01)
    load_into(again, load_file(str(tmp_path / "m.safetensors")), "m")
    assert torch.equal(again.policy.output.weight, model.policy.tok_embeddings.weight)
    assert again.policy.output.weight is again.policy.tok_embeddings.weight
    assert torch.equal(again.score_stats, model.score_stats) and float(again.kl_coef) == 0.05
    x = torch.tensor([[1, 2, 3]])
    assert all(torch.equal(a, b) for a, b in zip(again(x), model(x)))


def test_combine_scores():
    s, h = torch.tensor([-3.0, 2.0]), torch.tensor([5.0, 7.0])
    assert torch.equal(combine_scores([s, h], "llama2", [], 0.15), torch.tensor([-3.0, 7.0]))  # sigmoid(-3) < 0.15
    assert torch.equal(combine_scores([s, h], "sum", [1.0, 0.5], 0.15), torch.tensor([-0.5, 5.5]))


def test_sampler_equals_one_row_full_forward_sampling(align_base):
    """The batched, left-padded KV-cache sampler gives each prompt the tokens a plain one-row, full-forward loop
    draws with the same seeded generator (so an answer does not depend on its batch)."""
    from llamalab.inference.sampling import make_generator, sample_row
    from llamalab.model.folder import load

    model = load(align_base).model.eval()
    prompts = [[1, 5, 9, 14], [1, 7], [1, 3, 3, 8, 20, 31, 2]]
    params = [SamplingParams(max_tokens=6, temperature=1.0, seed=10 + i) for i in range(3)]
    stop = {2}
    got = sample_answers(model, prompts, params, stop, pad_id=0, batch_size=3)
    for p, sp, (ans, why) in zip(prompts, params, got):
        g, ids, want = make_generator(sp.seed), list(p), []
        reason = "length"
        with torch.no_grad():
            for _ in range(sp.max_tokens):
                t = sample_row(model(torch.tensor([ids]))[0, -1], sp, g)
                want.append(t)
                ids.append(t)
                if t in stop:
                    reason = "stop"
                    break
        assert (ans, why) == (want, reason)


# ----------------------------------------------------------------------------- runs


def _cfg(tmp, base, data, name, iterations=4, **ppo):
    from llamalab.commands.ppo import Config

    p = PPOConfig(rollout_batch=32, minibatch=16, epochs=2, max_new_tokens=8, rollout_micro=16, **ppo)
    cfg = Config(policy=str(base), data=[str(data)], reward_fn=[f"{HERE}:letter_share"], run_dir=str(tmp / name),
                 iterations=iterations, ppo=p, device="cpu", seed=3, checkpoint_interval=1)
    cfg.optim.lr = 3e-3
    return cfg


def _run(tmp, base, data, name, iterations=8, **ppo):
    from llamalab.commands.ppo import main

    return main(_cfg(tmp, base, data, name, iterations, **ppo))


def _metrics(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(64, seed=1))


def test_reward_rises_while_kl_stays_bounded(tmp_path, align_base, prompts_file):
    """With the KL penalty (beta 1 here: the tiny policy moves fast at lr 1e-2) the policy's reward rises and its
    KL to the reference stays under the limit; the same run without the penalty (the control) goes past it."""
    from llamalab.commands.ppo import main

    limit = 3.0  # nats per 8-token answer
    runs = {}
    for beta in (1.0, 0.0):
        cfg = _cfg(tmp_path, align_base, prompts_file, f"beta{beta:g}", iterations=6, kl_coef=beta)
        cfg.optim.lr, cfg.checkpoint_interval = 1e-2, 6
        runs[beta] = main(cfg)["iterations"]
    table = runs[1.0]
    assert [t["iteration"] for t in table] == list(range(6))
    first, last = sum(t["score"] for t in table[:2]) / 2, sum(t["score"] for t in table[-2:]) / 2
    assert last > first + 0.03, [t["score"] for t in table]
    assert max(t["kl"] for t in table) < limit, [t["kl"] for t in table]
    assert max(t["kl"] for t in runs[0.0]) > limit, [t["kl"] for t in runs[0.0]]
    assert table[0]["kl"] == 0.0  # the first rollout is sampled from the reference itself
    run = tmp_path / "beta1"
    rows = _metrics(run)
    assert len(rows) == 6 * 4
    for key in ("score", "reward", "kl", "kl_coef", "entropy", "clip_frac", "value_loss", "approx_kl", "policy_loss"):
        assert all(key in r for r in rows), key
    assert (run / "model" / "config.json").exists() and (run / "report.html").exists()
    assert json.loads((run / "model" / "config.json").read_text())["chat_template"] == "llama2"
    meta = json.loads((run / "meta.json").read_text())
    assert meta["kind"] == "ppo" and meta["data"]["files"][0]["sha256"] and meta["base"]["weights_sha256"]
    assert meta["rewards"] == [{"reward_fn": f"{HERE}:letter_share"}]
    assert len(json.loads((run / "samples.json").read_text())) == 12
    pytest.importorskip("matplotlib")
    page = (run / "report.html").read_text()
    assert all(f'alt="{t}"' in page for t in ("Reward", "Kl", "Entropy", "Score", "Clip frac", "Value loss"))


def test_lora_trains_only_adapters_and_value_head(tmp_path, align_base, prompts_file):
    from llamalab.align.ppo import PPOLoRAConfig
    from llamalab.commands.ppo import main
    from llamalab.model.folder import load

    cfg = _cfg(tmp_path, align_base, prompts_file, "lora", iterations=2, kl_coef=0.1, kl_target=0.01, kl_horizon=64)
    cfg.lora = PPOLoRAConfig(rank=4)
    cfg.optim.lr = 1e-2
    res = main(cfg)
    run = tmp_path / "lora"
    assert res["steps"] == 8
    base = load_file(str(Path(align_base) / "model.safetensors"))
    after = load_file(str(sorted(run.glob("checkpoints/step_*"))[-1] / "model" / "model.safetensors"))
    for prefix in ("policy.", "value.trunk."):
        frozen = [k for k in after if k.startswith(prefix) and ".lora_" not in k]
        assert len(frozen) == len(base) - (prefix == "value.trunk.")  # the value trunk has no LM head
        for k in frozen:
            assert torch.equal(after[k], base[k[len(prefix):]]), k
        assert any(k.startswith(prefix) and ".lora_B" in k and after[k].abs().sum() > 0 for k in after), prefix
    assert after["value.head.weight"].abs().sum() > 0
    assert (run / "adapter" / "adapter_model.safetensors").exists()
    merged = load(run / "model").model  # a plain model folder, adapters merged
    assert sum(p.numel() for p in merged.parameters()) == sum(v.numel() for v in base.values())
    # adaptive KL (--ppo.kl-target): beta follows Ziegler et al.'s controller from one iteration to the next
    it = res["iterations"]
    assert it[0]["kl_coef"] == pytest.approx(0.1)
    assert it[1]["kl_coef"] == pytest.approx(adapt_kl(0.1, it[0]["kl"], 0.01, 32, 64), rel=1e-6)  # logged as fp32


def test_resume_equals_straight_run(tmp_path, align_base, prompts_file):
    from llamalab.commands.ppo import main

    main(_cfg(tmp_path, align_base, prompts_file, "straight", iterations=2))
    cut = _cfg(tmp_path, align_base, prompts_file, "cut", iterations=2)
    cut.stop_after = 1
    res = main(cut)
    assert res["steps"] == 4  # 1 iteration x 2 epochs x 2 minibatches
    again = _cfg(tmp_path, align_base, prompts_file, "cut", iterations=2)
    again.resume = True
    main(again)
    a = load_file(str(tmp_path / "straight" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = _metrics(tmp_path / "straight"), _metrics(tmp_path / "cut")
    drop = ("tokens_per_s", "step_time", "elapsed", "mfu")
    assert [{k: v for k, v in r.items() if k not in drop} for r in ma] == \
           [{k: v for k, v in r.items() if k not in drop} for r in mb]


def test_bad_inputs(tmp_path, align_base, prompts_file):
    from llamalab.commands.ppo import Config, main

    with pytest.raises(LlamalabError, match="reward"):
        Config(policy=str(align_base), data=[str(prompts_file)]).validate()
    with pytest.raises(LlamalabError, match="multiple of ppo.minibatch"):
        PPOConfig(rollout_batch=30, minibatch=16).validate()
    cfg = _cfg(tmp_path, align_base, prompts_file, "bad", iterations=1)
    cfg.reward_fn = [f"{HERE}:bad_count"]
    with pytest.raises(LlamalabError, match="bad_count: returned"):
        main(cfg)
    cfg = _cfg(tmp_path, align_base, prompts_file, "bad2", iterations=1)
    cfg.reward_fn = ["no_such_module_xyz:f"]
    with pytest.raises(LlamalabError, match="cannot import"):
        main(cfg)
    # prompt records and preference pairs mix; a repeated prompt is sampled once (counted); prompts longer than the
    # context minus max_new_tokens are dropped and counted with file:line, not lost silently
    pairs = synthetic_pairs(38, seed=2)
    recs = pairs + [{"prompt": "Tell me about the inn."}, {"messages": [{"role": "user", "content": "Hi there."}]},
                    {"prompt": pairs[0]["prompt"]}, {"prompt": "word " * 300, "chosen": "a", "rejected": "b"}]
    long = write_jsonl(tmp_path / "long.jsonl", recs)
    cfg = _cfg(tmp_path, align_base, long, "long", iterations=1)
    res = main(cfg)
    led = res["prompts"]
    assert (led["read"], led["duplicates"], led["dropped"], led["kept"]) == (42, 1, {"prompt_too_long": 1}, 40)
    assert led["errors"][0].startswith(f"{long}:42: prompt of ")


def test_ppo_against_a_trained_reward_model(tmp_path, align_base, prompts_file):
    """The issue's test: a reward model trained on the synthetic marker preference (``llamalab rm``), then PPO
    against it: the reward model's mean score of the policy's answers rises while the KL stays under the limit."""
    from llamalab.commands import rm
    from llamalab.commands.ppo import main

    pairs = write_jsonl(tmp_path / "rm_pairs.jsonl", synthetic_pairs(160, seed=0))
    rm.main(rm.Config(base=str(align_base), data=[str(pairs)], run_dir=str(tmp_path / "rm"), batch_size=16,
                      heldout_fraction=0.25, eval_interval=0, device="cpu", optim=rm.RMOptimConfig(lr=3e-3)))
    # NOTE: kl_coef 0.5, not 0.3: at 0.3 this 8-iteration run at lr 5e-3 peaked at KL 2.66 with PyTorch's attention
    # and 3.59 with the fused CPU kernels (rounding changes sampled tokens, and the run amplifies it); at 0.5 both
    # peak at 1.9-2.2 nats and the score still rises by 0.28-0.38
    cfg = _cfg(tmp_path, align_base, prompts_file, "ppo_rm", iterations=8, kl_coef=0.5)
    cfg.reward_fn, cfg.reward_model = [], [str(tmp_path / "rm")]
    cfg.ppo.epochs, cfg.optim.lr, cfg.checkpoint_interval = 4, 5e-3, 8
    res = main(cfg)
    table = res["iterations"]
    scores, kls = [t["score"] for t in table], [t["kl"] for t in table]
    assert sum(scores[-2:]) / 2 > sum(scores[:2]) / 2 + 0.15, scores  # (measured: -2.25 -> -1.94)
    assert max(kls) < 3.0, kls
    meta = json.loads((tmp_path / "ppo_rm" / "meta.json").read_text())
    rec = meta["rewards"][0]["reward_model"]
    assert rec["weights_sha256"] and rec["template"] == "llama2" and rec["path"].endswith("model")


def test_default_prompt_limit_is_1024_tokens_with_the_answer(tmp_path, tiny_config, align_tok):
    """A long-context policy (SmolLM2: 8192) takes prompts up to 1024 - max_new_tokens by default, not its whole
    context: the update runs two models over prompt + answer with gradients (8 long HH dialogues: > 21 GB)."""
    from llamalab.commands.ppo import main
    from llamalab.model import Transformer
    from llamalab.model.folder import save_model

    tiny_config.vocab_size, tiny_config.max_seq_len = align_tok.vocab_size, 2048
    torch.manual_seed(0)
    base = save_model(tmp_path / "base", Transformer(tiny_config), align_tok.path)
    n = len(align_tok.encode("word " * 100, bos=False)) / 100  # tokens per "word "
    recs = synthetic_pairs(15, seed=4) + [{"prompt": "word " * int(1200 / n)}]
    data = write_jsonl(tmp_path / "p.jsonl", recs)
    cfg = _cfg(tmp_path, base, data, "long", iterations=1)
    cfg.ppo.rollout_batch, cfg.ppo.minibatch = 8, 8
    led = main(cfg)["prompts"]
    assert led["max_prompt_len"] == 1024 - 8
    assert led["dropped"] == {"prompt_too_long": 1} and led["kept"] == 15
