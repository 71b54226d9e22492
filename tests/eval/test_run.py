"""`llamalab eval run`: several task kinds on a model folder, JSON results and the summary table."""

from __future__ import annotations

import json

from llamalab.cli import main as cli_main
from tests.conftest import shared_path


def test_eval_run_cli(eval_model_folder, tmp_path, capsys):
    text = tmp_path / "heldout.txt"
    text.write_text(shared_path("corpus/botchan.txt").read_text(encoding="utf-8-sig")[:4000], encoding="utf-8")
    out = tmp_path / "res"
    rc = cli_main(["eval", "run", str(eval_model_folder), "--task", "arc_easy,hellaswag,perplexity,gsm8k",
                   "--path", f"{shared_path('eval/arc/ARC-Easy-Dev.jsonl')},{shared_path('eval/hellaswag_100.jsonl')},"
                   f"{text},{shared_path('eval/gsm8k_100.jsonl')}",
                   "--limit", "4", "--max-new-tokens", "6", "--num-fewshot", "1", "--output", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "arc_easy" in printed and "acc_norm" in printed and "bits_per_byte" in printed
    arc = json.loads((out / "arc_easy.json").read_text())
    assert arc["n"] == 4 and len(arc["items"]) == 4 and 0.0 <= arc["metrics"]["acc"] <= 1.0
    rec = arc["items"][0]
    assert len(rec["loglik"]) == 4 and rec["pred"] == max(range(4), key=lambda i: rec["loglik"][i])
    assert arc["metrics"]["acc"] == sum(r["acc"] for r in arc["items"]) / 4
    ppl = json.loads((out / "perplexity.json").read_text())["metrics"]
    assert ppl["bits_per_byte"] > 0 and ppl["tokens"] > 256  # more than one window
    gsm = json.loads((out / "gsm8k.json").read_text())
    assert gsm["task_def"]["num_fewshot"] == 1 and "completion" in gsm["items"][0]


def test_eval_run_errors(eval_model_folder, tmp_path, capsys):
    rc = cli_main(["eval", "run", str(eval_model_folder), "--task", "arc_easy,hellaswag", "--path", "x.jsonl"])
    assert rc == 2 and "2 task(s) need 2 data file(s)" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "choices": ["a", "b"], "answer": 2}\n')
    rc = cli_main(["eval", "run", str(eval_model_folder), "--task", "mc", "--path", str(bad), "--output", ""])
    assert rc == 2 and "bad.jsonl:1:" in capsys.readouterr().err


def test_eval_run_with_a_bpe_tokenizer_json(tmp_path, capsys):
    """Eval takes whatever tokenizer the loader returns: here a byte-level BPE tokenizer.json, no tokenizer.model."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from llamalab.model import ModelConfig, Transformer
    from llamalab.model.folder import save_model

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train([str(shared_path("corpus/botchan.txt"))],
             trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                 initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    spec = {**json.loads(tk.to_str()), "llamalab": {"bos_id": 0, "eos_id": 1}}
    torch.manual_seed(0)
    folder = tmp_path / "bpe-model"
    save_model(folder, Transformer(ModelConfig(dim=32, n_layers=1, n_heads=2, vocab_size=tk.get_vocab_size(),
                                               multiple_of=16, max_seq_len=128)))
    (folder / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    out = tmp_path / "res"
    rc = cli_main(["eval", "run", str(folder), "--task", "arc_easy,gsm8k", "--path",
                   f"{shared_path('eval/arc/ARC-Easy-Dev.jsonl')},{shared_path('eval/gsm8k_100.jsonl')}",
                   "--limit", "2", "--num-fewshot", "0", "--max-new-tokens", "4", "--device", "cpu",
                   "--output", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert json.loads((out / "arc_easy.json").read_text())["n"] == 2
    assert len(json.loads((out / "gsm8k.json").read_text())["items"]) == 2
