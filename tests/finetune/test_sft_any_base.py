"""SFT from any base llamalab reads, with any tokenizer kind: a Hugging Face folder whose tokenizer is a byte-level
BPE ``tokenizer.json`` (trained in-test with ``tokenizers``) and a .gguf file. The loss falls, the output folder
carries the base's tokenizer files (no SentencePiece model needed), loads and generates; then every stage that
reads a model runs on it (eval run, eval sweep over the run's checkpoints, memorization, convert to HF and GGUF)."""

from __future__ import annotations

import json

import pytest
import torch

from llamalab.cli import main as cli
from llamalab.commands.sft import Config
from llamalab.commands.sft import main as sft_main
from llamalab.finetune.optim import SFTOptimConfig
from llamalab.interop.convert import convert
from llamalab.model.folder import load
from tests.finetune.test_sft import FACTS, _answers, _data
from tests.interop.bpe_models import bpe_model_folder

pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def bpe_base(tmp_path_factory):
    root = tmp_path_factory.mktemp("bpe-base")
    return bpe_model_folder(root, "smollm", seed=5)


def _sft(base, run, steps=40, **kw):
    return sft_main(Config(base=str(base), data=[str(_data(run.parent))], format="alpaca", run_dir=str(run),
                           steps=steps, batch_size=4, optim=SFTOptimConfig(lr=1e-2), **kw))


def _same_tokenizer(a, b) -> None:
    for s in ("Who is Kiyo? 12345", "naïve café 🦙", "<|im_start|>user\nhi<|im_end|>"):
        assert a.encode(s, bos=a.add_bos) == b.encode(s, bos=b.add_bos)
    assert (a.bos_id, a.eos_id, a.add_bos, a.stop_ids) == (b.bos_id, b.eos_id, b.add_bos, b.stop_ids)


def test_sft_from_an_hf_folder_with_tokenizer_json(tmp_path, bpe_base):
    hf = convert(bpe_base, tmp_path / "hf", to="hf")[2]
    assert (hf / "tokenizer.json").exists() and not (hf / "tokenizer.model").exists()
    out = _sft(hf, tmp_path / "run", steps=60, checkpoint_interval=30)
    assert out["template"] == "chatml"  # the base's ChatML Jinja, mapped to ours of its family
    assert out["loss_curve"]["last"] < 0.3 * out["loss_curve"]["first"], out["loss_curve"]
    model_dir = tmp_path / "run" / "model"
    names = {p.name for p in model_dir.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json"} <= names and "tokenizer.model" not in names
    loaded = load(model_dir, device="cpu")
    _same_tokenizer(loaded.tokenizer, load(hf, device="cpu").tokenizer)
    assert sum(a == f["output"] for a, f in zip(_answers(model_dir), FACTS)) >= 3  # it learned the answers
    # the checkpoints carry the tokenizer too (the training loop writes the tokenizer object it was given)
    ck = tmp_path / "run" / "checkpoints"
    assert all((p / "model" / "tokenizer.json").exists() for p in ck.glob("step_*"))


def test_sft_from_a_gguf_file(tmp_path, bpe_base):
    path = convert(bpe_base, tmp_path / "base.gguf", to="gguf", gguf_type="f32")[2]
    out = _sft(path, tmp_path / "run", checkpoint_interval=0)
    assert out["loss_curve"]["last"] < 0.5 * out["loss_curve"]["first"], out["loss_curve"]
    meta = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert meta["chat_template"] == "chatml" and meta["sft"]["base"]["weights_sha256"]  # the .gguf file's sha256
    loaded = load(tmp_path / "run" / "model", device="cpu")
    _same_tokenizer(loaded.tokenizer, load(path, device="cpu").tokenizer)
    assert len(_answers(tmp_path / "run" / "model")) == len(FACTS)


def test_every_stage_reads_a_bpe_model(tmp_path, bpe_base, capsys):
    """eval run, eval sweep over an SFT run's checkpoints, memorization, convert back to HF and GGUF."""
    from tests.conftest import shared_path

    _sft(bpe_base, tmp_path / "run", steps=8, checkpoint_interval=4, keep_last=0)
    model_dir = tmp_path / "run" / "model"
    arc = shared_path("eval/arc/ARC-Easy-Dev.jsonl")
    rc = cli(["eval", "run", str(model_dir), "--task", "arc_easy", "--path", str(arc), "--limit", "4",
              "--output", str(tmp_path / "res")])
    assert rc == 0, capsys.readouterr().err
    res = json.loads((tmp_path / "res" / "arc_easy.json").read_text())
    assert res["n"] == 4 and all(len(r["loglik"]) == len(r["n_tokens"]) for r in res["items"])
    rc = cli(["eval", "sweep", str(tmp_path / "run"), "--task", "arc_easy", "--path", str(arc), "--limit", "3",
              "--plots", "false"])
    assert rc == 0, capsys.readouterr().err
    assert len(list((tmp_path / "run" / "eval").glob("step_*/arc_easy.json"))) == 2
    # memorization decodes token ids of the model: from the folder and from its GGUF export alike
    from llamalab.eval.memorization import memorize_run, samples_from_pairs
    from llamalab.eval.sweep import model_checkpoint

    tok = load(model_dir, device="cpu").tokenizer
    ids = tok.encode(" ".join(f["output"] for f in FACTS) * 3)
    samples, bounds = samples_from_pairs([(1, ids), (2, ids[5:])], chunks=2, min_len=16)
    gguf_file = convert(model_dir, tmp_path / "m.gguf", to="gguf", gguf_type="f32")[2]
    summary = memorize_run(tmp_path / "run", samples, bounds, 8, 8, plots=False,
                           checkpoints=[model_checkpoint(model_dir, 8), model_checkpoint(gguf_file, 8)])
    a, b = summary["checkpoints"]
    assert a["mean_score"] == b["mean_score"]  # an f32 GGUF export memorizes exactly what its folder does
    # `eval sweep RUN --model X.gguf`: the export scored like its folder, kept off the run's curves
    rc = cli(["eval", "sweep", str(tmp_path / "run"), "--task", "arc_easy", "--path", str(arc), "--limit", "4",
              "--model", str(gguf_file), "--plots", "false"])
    assert rc == 0, capsys.readouterr().err
    swept = json.loads((tmp_path / "run" / "eval" / "model-m" / "arc_easy.json").read_text())
    assert "step" not in swept and [r["loglik"] for r in swept["items"]] == [r["loglik"] for r in res["items"]]
    # convert back to HF: transformers loads the folder and its tokenizer
    transformers = pytest.importorskip("transformers")
    hf = convert(model_dir, tmp_path / "hf", to="hf")[2]
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf)
    assert hf_tok("Who is Kiyo?")["input_ids"] == tok.encode("Who is Kiyo?", bos=tok.add_bos)
    x = torch.tensor([tok.encode("Who is Kiyo?")])
    with torch.no_grad():
        torch.testing.assert_close(transformers.LlamaForCausalLM.from_pretrained(hf)(x).logits,
                                   load(model_dir, device="cpu").model(x), atol=1e-5, rtol=1e-5)
