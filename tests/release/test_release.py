"""The LLM360 release bundle: built from a short run, verified, tampered with, and read by transformers."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from llamalab import cli
from llamalab.release.bundle import CHECKSUMS, build_release, load_index
from llamalab.release.verify import VerifyReport, check_checksums, check_replay, verify_release
from tests.train.conftest import small_config


@pytest.fixture(scope="module")
def run(tmp_path_factory, botchan_shards):
    from llamalab.commands.pretrain import main

    root = tmp_path_factory.mktemp("release") / "run"
    main(small_config(botchan_shards, root, steps=6, checkpoint_interval=2, eval_interval=2, report=True))
    return root


@pytest.fixture(scope="module")
def bundle(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle") / "b"
    assert cli.main(["release", str(run), "--output", str(out)]) == 0  # the default subcommand
    return out


@pytest.fixture
def copy(bundle, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(bundle, dst)
    return dst


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_bundle_holds_everything_and_sha256sum_agrees(run, bundle):
    idx = json.loads((bundle / "release.json").read_text())
    assert [c["step"] for c in idx["checkpoints"]] == [2, 4, 6]
    rows = {r["step"]: r for r in _rows(run)}
    for c in idx["checkpoints"]:
        assert c["tokens_seen"] == rows[c["step"]]["tokens_seen"]
        assert c["val_loss"] == rows[c["step"]]["val_loss"]
        ck = bundle / c["path"]
        for f in ("state.json", "optimizer.safetensors", "rng.safetensors", "model/model.safetensors"):
            assert (ck / f).is_file(), f
    for f in ("README.md", "meta.json", "metrics.jsonl", "logbook.jsonl", "report.html", "model/config.json",
              "hf/config.json", "model.gguf", "tokenizer/tokenizer.model", "data/manifest.json", "data/steps.json"):
        assert (bundle / f).is_file(), f
    manifest = json.loads((bundle / "data/manifest.json").read_text())
    assert all((bundle / "data" / s["file"]).is_file() for s in manifest["shards"])
    # the chunk -> step map agrees with the order library (which-step) on a logged step
    from llamalab.data.order import which_step

    steps = json.loads((bundle / "data/steps.json").read_text())["steps"]
    assert set(steps) == {str(s) for s in rows}
    ws = which_step(run, 3)
    covered = steps["3"]["reads"]
    for w in ws["windows"]:
        assert any(f == w["shard"] and a <= w["start"] and w["end"] <= b for f, a, b in covered)
    # the checksum file is in the format the coreutils tool checks
    if shutil.which("sha256sum"):
        res = subprocess.run(["sha256sum", "-c", "--quiet", CHECKSUMS], cwd=bundle, capture_output=True, text=True)
        assert res.returncode == 0, res.stdout + res.stderr


def test_bundle_verifies_with_exact_replay(bundle, capsys):
    assert cli.main(["release", "verify", str(bundle), "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "replay" in out and "bit-exact" in out
    rep = verify_release(bundle, steps=2, from_step=2)  # an earlier checkpoint, also exact
    assert rep.ok, rep.table()
    status = {c: (s, d) for c, s, d in rep.rows}
    assert status["replay"][0] == "PASS" and "steps 3-4" in status["replay"][1]
    assert status["format transformers"][0] == "PASS"
    assert status["format gguf f16"][0] == "PASS"


def test_flipping_one_byte_in_any_file_fails_naming_it(bundle, copy):
    files = sorted(p.relative_to(copy).as_posix() for p in copy.rglob("*") if p.is_file())
    files.remove(CHECKSUMS)
    assert len(files) > 30
    for rel in files:
        p = copy / rel
        data = bytearray(p.read_bytes())
        data[len(data) // 2] ^= 0x01
        p.write_bytes(bytes(data))
        rep = VerifyReport()
        assert not check_checksums(copy, rep), rel
        assert rel in rep.rows[0][2]
        data[len(data) // 2] ^= 0x01
        p.write_bytes(bytes(data))
    rep = VerifyReport()
    assert check_checksums(copy, rep), rep.table()


def test_flipped_byte_makes_the_command_fail_naming_the_file(copy, capsys):
    p = copy / "hf" / "model.safetensors"
    data = bytearray(p.read_bytes())
    data[-3] ^= 0x10
    p.write_bytes(bytes(data))
    assert cli.main(["release", "verify", str(copy)]) == 2
    err = capsys.readouterr().err
    assert "hf/model.safetensors" in err and "checksums" in err


def test_deleting_a_checkpoint_fails(copy):
    shutil.rmtree(copy / "checkpoints" / "step_000004")
    rep = verify_release(copy, steps=1)
    assert not rep.ok
    failed = {c: d for c, s, d in rep.rows if s == "FAIL"}
    assert "checkpoints/step_000004" in failed["checksums"]
    assert "checkpoints/step_000004: missing" in failed["checkpoints"]


def test_edited_metric_fails_even_with_rewritten_checksums(copy):
    """A loss edited in metrics.jsonl fails the checksum; rewriting checksums.sha256 to hide it, the re-run does."""
    from llamalab.release.bundle import write_checksums

    lines = (copy / "metrics.jsonl").read_text().splitlines()
    row = json.loads(lines[4])
    assert row["step"] == 5
    row["loss"] = row["loss"] - 1e-6
    lines[4] = json.dumps(row)
    (copy / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    rep = verify_release(copy, steps=2)
    failed = {c: d for c, s, d in rep.rows if s == "FAIL"}
    assert "metrics.jsonl" in failed["checksums"]
    assert "metrics.jsonl" in failed["replay"] and "step 5 loss" in failed["replay"]
    write_checksums(copy)
    rep = VerifyReport()
    assert check_checksums(copy, rep)
    check_replay(copy, load_index(copy), rep, steps=2, from_step=None, device="cpu")
    assert rep.rows[-1][:2] == ("replay", "FAIL") and "step 5 loss" in rep.rows[-1][2]


def test_model_card_renders_and_states_the_records(run, bundle):
    import yaml
    from markdown_it import MarkdownIt

    text = (bundle / "README.md").read_text()
    assert text.startswith("---\n")
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["library_name"] == "llamalab" and front["license"]
    assert front["datasets"] == ["books"] and "loss" in front["metrics"] and "llamalab" in front["tags"]
    html = MarkdownIt().enable("table").render(text.split("---\n", 2)[2])
    assert "<table>" in html and "<h2>Checkpoints</h2>" in html
    meta = json.loads((run / "meta.json").read_text())
    rows = _rows(run)
    val = [r for r in rows if "val_loss" in r][-1]["val_loss"]
    assert f"parameters: **{meta['n_params']:,}**" in text
    assert f"tokens seen: **{rows[-1]['tokens_seen']:,}**" in text
    assert f"final validation loss: **{val:.4f}**" in text
    for s in json.loads((run / "data/manifest.json").read_text())["shards"]:
        assert s["sha256"] in text
    assert "Checkpoint sweep: not run" in text and "## Memorization" in text


def test_hf_export_in_bundle_loads_with_transformers(run, bundle):
    transformers = pytest.importorskip("transformers")
    from llamalab.model.folder import load_model

    hf = transformers.AutoModelForCausalLM.from_pretrained(bundle / "hf", dtype=torch.float32).eval()
    ours, _ = load_model(run / "model")
    tokens = torch.randint(0, ours.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, ours(tokens), atol=1e-4, rtol=1e-4)
    tok = transformers.AutoTokenizer.from_pretrained(bundle / "hf")
    assert tok("Botchan")["input_ids"]


def test_no_data_bundle_keeps_hashes_and_skips_replay(run, tmp_path):
    out = build_release(run, tmp_path / "nd", include_data=False, gguf=False)
    assert not list((out / "data").glob("*.bin"))
    idx = json.loads((out / "release.json").read_text())
    assert not idx["data"]["included"] and all(s["sha256"] for s in idx["data"]["shards"])
    assert "NOT included" in (out / "README.md").read_text()
    rep = verify_release(out)
    assert rep.ok, rep.table()
    assert dict((c, s) for c, s, _ in rep.rows)["replay"] == "SKIP"


def test_refuses_a_non_empty_output(run, bundle):
    from llamalab.common import LlamalabError

    with pytest.raises(LlamalabError, match="not empty"):
        build_release(run, bundle)
