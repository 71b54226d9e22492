"""End to end: a tiny model learns a handful of instructions through `llamalab sft`, and the
result loads in the engine, `llamalab generate`, `llamalab chat` and the exporters."""

from __future__ import annotations

import io
import json

import pytest
import torch

from llamalab.cli import main as cli
from llamalab.commands.sft import Config
from llamalab.commands.sft import main as sft_main
from llamalab.finetune.lora import LoRAConfig
from llamalab.finetune.optim import SFTOptimConfig
from llamalab.inference.engine import Engine
from llamalab.inference.sampling import SamplingParams
from llamalab.inference.terminal import answer
from llamalab.model.folder import load_model

FACTS = [
    {"instruction": "Who is the hero?", "input": "", "output": "Botchan, a young teacher."},
    {"instruction": "Where does he teach?", "input": "", "output": "In a school on Shikoku."},
    {"instruction": "Who is Kiyo?", "input": "", "output": "His old servant."},
    {"instruction": "What does he eat?", "input": "", "output": "Dumplings and tempura."},
]


def _answers(folder) -> list[str]:
    engine = Engine.from_folder(folder, slots=1)
    template = engine.meta.get("chat_template", "llama2")
    params = SamplingParams(max_tokens=16, temperature=0.0)
    return [answer(engine, [{"role": "user", "content": f["instruction"]}], template, params, lambda s: None).strip()
            for f in FACTS]


def _data(tmp_path):
    p = tmp_path / "facts.json"
    p.write_text(json.dumps(FACTS), encoding="utf-8")
    return p


def test_tiny_model_learns_instructions(tmp_path, tiny_base, monkeypatch, capsys):
    want = [f["output"] for f in FACTS]
    before = _answers(tiny_base)
    assert sum(a == w for a, w in zip(before, want)) == 0
    cfg = Config(base=str(tiny_base), data=[str(_data(tmp_path))], format="alpaca", template="llama2",
                 run_dir=str(tmp_path / "run"), steps=50, batch_size=4, optim=SFTOptimConfig(lr=1e-2),
                 checkpoint_interval=0)
    out = sft_main(cfg)
    assert out["steps"] == 50 and out["data"]["kept"] == 4
    assert out["loss_curve"]["last"] < 0.1 * out["loss_curve"]["first"]
    assert _answers(tmp_path / "run" / "model") == want
    meta = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert meta["chat_template"] == "llama2" and meta["sft"]["steps"] == 50
    # `llamalab chat` (stdin piped) answers with the recorded template
    monkeypatch.setattr("sys.stdin", io.StringIO("Who is Kiyo?\n"))
    assert cli(["chat", str(tmp_path / "run" / "model"), "--temperature", "0", "--max-tokens", "12"]) == 0
    assert "assistant: His old servant." in capsys.readouterr().out
    pytest.importorskip("fastapi")
    from llamalab.serve.api import build_server

    assert build_server(Engine.from_folder(tmp_path / "run" / "model", slots=1)).template == "llama2"


def test_cli_lora_end_to_end(tmp_path, tiny_base, capsys):
    sharegpt = tmp_path / "conv.jsonl"
    convs = [{"conversations": [{"from": "human", "value": f["instruction"]}, {"from": "gpt", "value": f["output"]}]}
             for f in FACTS] + [{"conversations": [{"from": "human", "value": "hello?"}]}]
    sharegpt.write_text("".join(json.dumps(c) + "\n" for c in convs), encoding="utf-8")
    run = tmp_path / "lora_run"
    rc = cli(["sft", "--base", str(tiny_base), "--data", str(sharegpt), "--format", "sharegpt", "--template", "chatml",
              "--run-dir", str(run), "--steps", "30", "--batch-size", "4", "--optim.lr", "2e-2", "--lora.rank", "8",
              "--lora.targets", "wq,wk,wv,wo,w1,w2,w3,output", "--lora.dropout", "0"])
    err = capsys.readouterr().err + capsys.readouterr().out
    assert rc == 0, err
    assert (run / "adapter" / "adapter_model.safetensors").exists()
    data = json.loads((run / "sft_data.json").read_text())
    assert data["dropped"] == {"no_assistant_turn": 1} and data["kept"] == 4
    merged, meta = load_model(run / "model")
    base, _ = load_model(tiny_base)
    assert meta["chat_template"] == "chatml" and meta["sft"]["lora"]["rank"] == 8
    # the merged folder equals base + adapter, and differs from the base
    from llamalab.finetune.lora import load_adapter

    load_adapter(run / "adapter", base, base_sha256=meta["sft"]["base"]["weights_sha256"])
    x = torch.randint(0, merged.cfg.vocab_size, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(merged(x), base.eval()(x), atol=1e-4, rtol=1e-4)
    assert cli(["generate", str(run / "model"), "--prompt", "Who is Kiyo?", "--max-tokens", "5",
                "--temperature", "0"]) == 0
    # NOTE: a rank-8 adapter on a *random* tiny base cannot memorise the answers in a few steps (the
    # frozen norms cap the logits); LoRA's learning check is test_lora_learns_new_answers_on_a_tuned_base.
    curve = json.loads((run / "sft_summary.json").read_text())["loss_curve"]
    assert curve["last"] < 0.5 * curve["first"], curve
    assert len(_answers(run / "model")) == len(FACTS)  # `llamalab chat`'s answer() runs on the folder
    run_meta = json.loads((run / "meta.json").read_text())  # the run's record, as for pretraining
    assert run_meta["kind"] == "sft" and run_meta["git_sha"] and run_meta["versions"]["torch"]
    assert run_meta["data"]["files"][0]["sha256"] and run_meta["base"]["weights_sha256"]
    page = (run / "report.html").read_text()
    assert "Fine-tuning data" in page and "no_assistant_turn" in page and page.count("<img") >= 3


def test_exporters_accept_sft_output(tmp_path, tiny_base):
    cfg = Config(base=str(tiny_base), data=[str(_data(tmp_path))], format="alpaca", run_dir=str(tmp_path / "r"),
                 steps=2, batch_size=2, checkpoint_interval=0, val_fraction=0.25, eval_interval=1)
    out = sft_main(cfg)
    assert out["val_examples"] == 1 and out["val_loss"] > 0  # one of the 4 records held out
    assert out["data"]["examples"] == 4
    rows = [json.loads(ln) for ln in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [("val_loss" in r) for r in rows] == [True, True]
    from llamalab.interop.hf import export_folder

    hf = export_folder(tmp_path / "r" / "model", tmp_path / "hf")
    assert (hf / "config.json").exists()
    pytest.importorskip("gguf")
    from llamalab.interop.gguf import export_gguf_folder, load_gguf

    g = export_gguf_folder(tmp_path / "r" / "model", tmp_path / "m.gguf", "f32")
    _, kv = load_gguf(g)
    assert kv.get("llamalab.chat_template") == "llama2"


def test_cli_rejects_malformed_with_location(tmp_path, tiny_base, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": 3, "output": "b"}\n', encoding="utf-8")
    rc = cli(["sft", "--base", str(tiny_base), "--data", str(bad), "--format", "alpaca",
              "--run-dir", str(tmp_path / "x")])
    assert rc == 2
    assert f"{bad}:2: field 'instruction'" in capsys.readouterr().err


def test_stop_and_resume_equals_straight_run(tmp_path, tiny_base):
    """The SFT batch order is a pure function of the step: 3 steps + stop + resume == 6 steps straight."""
    common = {"base": str(tiny_base), "data": [str(_data(tmp_path))], "format": "alpaca", "steps": 6,
              "batch_size": 1, "micro_batch_size": 1, "optim": SFTOptimConfig(lr=1e-3), "checkpoint_interval": 0,
              "packing": False, "keep_last": 0}
    sft_main(Config(run_dir=str(tmp_path / "straight"), **common))
    part = sft_main(Config(run_dir=str(tmp_path / "split"), stop_after=3, **common))
    assert part["steps"] == 3 and not (tmp_path / "split" / "model").exists()
    sft_main(Config(run_dir=str(tmp_path / "split"), resume=True, **common))
    a, _ = load_model(tmp_path / "straight" / "model")
    b, _ = load_model(tmp_path / "split" / "model")
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k


def test_val_split_holds_out_whole_records():
    from llamalab.finetune.data import Example, split_val

    exs = [Example([1, 5, 6], [0, 1, 1], f"f:{r}", record=r) for r in (1, 1, 1, 2, 3, 3, 4, 5, 6, 7, 8, 9, 10)]
    train, val = split_val(exs, 0.2, seed=0)
    assert len(train) + len(val) == len(exs) and val
    assert not {e.record for e in train} & {e.record for e in val}
    assert len({e.record for e in val}) == 2


def test_lora_learns_new_answers_on_a_tuned_base(tmp_path, tiny_base):
    """LoRA (base frozen) re-targets a model that already follows the template: after full SFT on
    FACTS, a rank-8 adapter learns the rotated answers, which the tuned base does not give."""
    sft_main(Config(base=str(tiny_base), data=[str(_data(tmp_path))], format="alpaca", template="llama2",
                    run_dir=str(tmp_path / "full"), steps=50, batch_size=4, optim=SFTOptimConfig(lr=1e-2),
                    checkpoint_interval=0))
    rotated = [dict(f, output=FACTS[(i + 1) % len(FACTS)]["output"]) for i, f in enumerate(FACTS)]
    (tmp_path / "rot.json").write_text(json.dumps(rotated), encoding="utf-8")
    want = [r["output"] for r in rotated]
    tuned = tmp_path / "full" / "model"
    assert sum(a == w for a, w in zip(_answers(tuned), want)) == 0
    out = sft_main(Config(base=str(tuned), data=[str(tmp_path / "rot.json")], format="alpaca",
                          run_dir=str(tmp_path / "lora"), steps=30, batch_size=4, optim=SFTOptimConfig(lr=1e-2),
                          checkpoint_interval=0,
                          lora=LoRAConfig(rank=8, dropout=0.0, targets=["wq", "wk", "wv", "wo", "w1", "w2", "w3"])))
    assert out["template"] == "llama2"  # taken from the tuned base's folder
    assert _answers(tmp_path / "lora" / "model") == want


def test_optim_flags_are_pretrainings_with_sft_defaults(tmp_path):
    """`--optim.*` as in pretraining; a flag given keeps SFT's other defaults (cosine to 0, 3% warmup)."""
    from llamalab.common import LlamalabError
    from llamalab.config import parse_config
    from llamalab.train.optim import warmup_steps_for

    base = ["--base", "b", "--data", "d.json"]
    cfg, _ = parse_config(Config, base + ["--optim.lr", "3e-4"])
    optim = cfg.optim
    assert (optim.lr, optim.min_lr_ratio, optim.warmup_ratio, optim.weight_decay) == (3e-4, 0.0, 0.03, 0.1)
    assert cfg.optim.peak_lr(lora=True) == 3e-4 and Config().optim.peak_lr(lora=True) == 2e-4
    assert Config().optim.peak_lr(lora=False) == 2e-5 and warmup_steps_for(cfg.optim, 200) == 6
    cfg, _ = parse_config(Config, base + ["--optim.warmup-steps", "5", "--optim.warmup-ratio", "0"])
    assert warmup_steps_for(cfg.optim, 200) == 5
    with pytest.raises(LlamalabError, match="add --optim.warmup-ratio 0"):
        parse_config(Config, base + ["--optim.warmup-steps", "5"])


def test_default_rows_are_capped_at_1024_tokens(tmp_path, tiny_config, sft_tok):
    """A long-context base (SmolLM2: 8192) no longer packs rows of its whole context by default: those rows'
    logits (8 x 8192 x 49k) got the process killed for memory on a 24 GB machine."""
    from llamalab.finetune.stage import DEFAULT_LENGTH as DEFAULT_SEQ_LEN
    from llamalab.finetune.stage import default_micro
    from llamalab.model import Transformer
    from llamalab.model.folder import save_model

    tiny_config.vocab_size, tiny_config.max_seq_len = sft_tok.vocab_size, 4096
    torch.manual_seed(0)
    base = save_model(tmp_path / "base", Transformer(tiny_config), sft_tok.path)
    out = sft_main(Config(base=str(base), data=[str(_data(tmp_path))], format="alpaca", template="llama2",
                          run_dir=str(tmp_path / "run"), steps=1, batch_size=8, checkpoint_interval=0))
    assert out["steps"] == 1
    ledger = json.loads((tmp_path / "run" / "sft_data.json").read_text())
    assert ledger["seq_len"] == DEFAULT_SEQ_LEN == 1024
    # rows per forward pass: 4096 tokens' worth, 1..8, never more than a process's rows
    assert [default_micro(8, n) for n in (128, 1024, 4096, 8192)] == [8, 4, 1, 1]
    assert default_micro(2, 128) == 2
    # an explicit --seq-len is still bounded by the context, with the flag named
    with pytest.raises(Exception, match="--seq-len 8192 exceeds the model's context"):
        sft_main(Config(base=str(base), data=[str(_data(tmp_path))], format="alpaca", run_dir=str(tmp_path / "r2"),
                        seq_len=8192, steps=1, batch_size=2, checkpoint_interval=0))
