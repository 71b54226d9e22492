"""Check a release bundle on this machine (``llamalab release verify DIR``).

1. checksums: every file in ``checksums.sha256`` exists with that sha256, and no file is unlisted;
2. formats: the final model loads as llamalab, HF (our loader, and ``transformers`` when installed)
   and GGUF, and all give the same logits on a fixed token batch (``LOGIT_TOL``; f16 GGUF looser);
3. replay: ``steps`` optimizer steps re-run from a kept checkpoint through ``llamalab pretrain
   --resume`` with the recorded config and the bundle's data, in a temporary run folder; the losses,
   grad norms and batch indices must equal ``metrics.jsonl`` bit for bit on the device type that
   trained the run, and agree within ``CROSS_DEVICE_RTOL`` on another device type.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamalab.common import LlamalabError, read_json, sha256_file
from llamalab.release.bundle import (
    CHECKSUMS,
    HF_DIR,
    MODEL_SUBDIR,
    device_type,
    load_index,
    read_metrics,
)
from llamalab.run_dir import RunDir

LOGIT_TOL = {"hf": 1e-5, "transformers": 1e-4, "gguf_f32": 1e-4, "gguf_f16": 1e-2}  # max |logit difference|
# NOTE: f16 rounds every weight by up to 2^-11 relative, so its logit error grows with the logits' size: the
# gguf_f16 tolerance is relative to max(1, the largest |logit|). SmolLM2-135M (logits ~20): 0.035 off, real.
RELATIVE_TOL = {"gguf_f16"}
CROSS_DEVICE_RTOL = 2e-2  # relative loss difference allowed when re-running on another device type
REPLAYED = ("loss", "grad_norm", "batch", "val_loss")
LINE_RE = re.compile(r"^([0-9a-f]{64}) [ *](.+)$")


@dataclass
class VerifyReport:
    rows: list[tuple[str, str, str]] = field(default_factory=list)  # (check, PASS|FAIL|SKIP, detail)

    @property
    def ok(self) -> bool:
        return all(status != "FAIL" for _, status, _ in self.rows)

    def add(self, check: str, status: str, detail: str) -> None:
        self.rows.append((check, status, detail))

    def failures(self) -> list[tuple[str, str, str]]:
        return [r for r in self.rows if r[1] == "FAIL"]

    def table(self) -> str:
        w = max([len(c) for c, _, _ in self.rows] + [5])
        lines = [f"{'check':<{w}}  result  detail", f"{'-' * w}  ------  ------"]
        lines += [f"{c:<{w}}  {s:<6}  {d}" for c, s, d in self.rows]
        verdict = "PASS" if self.ok else "FAIL"
        lines.append(f"{'':<{w}}  {verdict:<6}  {len(self.failures())} of {len(self.rows)} checks failed")
        return "\n".join(lines)


def check_checksums(root: Path, report: VerifyReport) -> bool:
    """Every listed file present with its sha256; no file missing from the list. Names each bad file."""
    path = root / CHECKSUMS
    if not path.exists():
        report.add("checksums", "FAIL", f"{path}: not found")
        return False
    listed: dict[str, str] = {}
    bad: list[str] = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        m = LINE_RE.match(line)
        if m is None:
            bad.append(f"{CHECKSUMS} line {i}: not '<sha256>  <path>'")
            continue
        listed[m.group(2)] = m.group(1)
    on_disk = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} - {CHECKSUMS}
    for rel, digest in sorted(listed.items()):
        f = root / rel
        if rel not in on_disk:
            bad.append(f"{rel}: missing")
        elif sha256_file(f) != digest:
            bad.append(f"{rel}: sha256 differs from {CHECKSUMS}")
    bad += [f"{rel}: not listed in {CHECKSUMS}" for rel in sorted(on_disk - set(listed))]
    if bad:
        more = f" (+{len(bad) - 5} more)" if len(bad) > 5 else ""
        report.add("checksums", "FAIL", "; ".join(bad[:5]) + more)
        return False
    report.add("checksums", "PASS", f"{len(listed)} files")
    return True


def check_checkpoints(root: Path, index: dict[str, Any], report: VerifyReport) -> None:
    """Every checkpoint the index lists is there with the weights sha256 it records."""
    bad = []
    for c in index.get("checkpoints", []):
        weights = root / c["path"] / MODEL_SUBDIR / "model.safetensors"
        if not weights.exists():
            bad.append(f"{c['path']}: missing")
        elif c.get("sha256") and sha256_file(weights) != c["sha256"]:
            bad.append(f"{weights.relative_to(root)}: sha256 differs from release.json")
    if bad:
        report.add("checkpoints", "FAIL", "; ".join(bad))
    else:
        report.add("checkpoints", "PASS", f"{len(index.get('checkpoints', []))} checkpoints: "
                                          f"steps {', '.join(str(c['step']) for c in index.get('checkpoints', []))}")


def _probe_tokens(vocab: int, seq: int):
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (2, min(16, seq)), generator=g)


def check_formats(root: Path, index: dict[str, Any], report: VerifyReport) -> None:
    """Load the final model in every released form and compare logits with the llamalab folder's."""
    import torch

    from llamalab.model.folder import load

    fm = index.get("formats") or {}
    try:
        ref = load(root / fm.get("llamalab", MODEL_SUBDIR), device="cpu", dtype=torch.float32, with_tokenizer=False)
    except LlamalabError as e:
        report.add("format llamalab", "FAIL", str(e))
        return
    tokens = _probe_tokens(ref.model.cfg.vocab_size, ref.model.cfg.max_seq_len)
    with torch.no_grad():
        want = ref.model(tokens).float()
    report.add("format llamalab", "PASS", f"{fm.get('llamalab', MODEL_SUBDIR)}/ loads; logits {tuple(want.shape)}")

    scale = max(1.0, float(want.abs().max()))

    def compare(name: str, path: Path, tol: float, fn, relative: bool = False) -> None:
        if not path.exists():
            report.add(f"format {name}", "FAIL", f"{path.relative_to(root)}: missing")
            return
        try:
            with torch.no_grad():
                got = fn(path)
        except Exception as e:  # noqa: BLE001 - any load failure is the finding
            report.add(f"format {name}", "FAIL", f"{path.relative_to(root)}: does not load: {e}")
            return
        diff = float((got - want).abs().max())
        limit = tol * scale if relative else tol
        ok = got.shape == want.shape and diff <= limit
        how = f"{tol:g} x max |logit| {scale:.1f} = {limit:.2g}" if relative else f"{tol:g}"
        report.add(f"format {name}", "PASS" if ok else "FAIL",
                   f"{path.relative_to(root)}: max |logit diff| {diff:.2e} (tolerance {how})")

    hf = root / fm.get("hf", HF_DIR)
    compare("hf", hf, LOGIT_TOL["hf"],
            lambda p: load(p, device="cpu", dtype=torch.float32, with_tokenizer=False).model(tokens).float())
    try:
        import transformers  # noqa: F401
    except ImportError:
        report.add("format transformers", "SKIP", "transformers is not installed")
    else:
        def via_transformers(p: Path):
            from transformers import AutoModelForCausalLM

            m = AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval()
            return m(tokens).logits.float()

        compare("transformers", hf, LOGIT_TOL["transformers"], via_transformers)
    if fm.get("gguf"):
        key = "gguf_f16" if fm.get("gguf_type") != "f32" else "gguf_f32"
        compare(f"gguf {fm.get('gguf_type')}", root / fm["gguf"], LOGIT_TOL[key],
                lambda p: load(p, device="cpu", dtype=torch.float32, with_tokenizer=False).model(tokens).float(),
                relative=key in RELATIVE_TOL)


def choose_start(index: dict[str, Any], rows: list[dict[str, Any]], steps: int, from_step: int | None) -> int:
    """The checkpoint to re-run from: ``from_step`` (a kept checkpoint), else the newest one followed by
    ``steps`` logged steps."""
    kept = [c["step"] for c in index.get("checkpoints", [])]
    logged = {int(r["step"]) for r in rows if "step" in r}
    if from_step is not None:
        if from_step not in kept:
            raise LlamalabError(f"--from-step {from_step}: no such checkpoint in the bundle (kept: {kept})")
        return from_step
    ok = [s for s in kept if all(s + i in logged for i in range(1, steps + 1))]
    if not ok:
        raise LlamalabError(f"--steps {steps}: no kept checkpoint ({kept}) is followed by {steps} logged steps")
    return ok[-1]


def _same(a: Any, b: Any, exact: bool) -> bool:
    if a is None or b is None:
        return a is b
    if exact:
        return a == b
    return math.isclose(float(a), float(b), rel_tol=CROSS_DEVICE_RTOL, abs_tol=1e-6)


def check_replay(root: Path, index: dict[str, Any], report: VerifyReport, steps: int, from_step: int | None,
                 device: str) -> None:
    """Re-run ``steps`` steps from a checkpoint with ``llamalab pretrain --resume`` and compare with metrics.jsonl."""
    from llamalab.cli import run_module
    from llamalab.release.bundle import _copy_tree

    bundle = RunDir(root)
    if not (index.get("data") or {}).get("included"):
        report.add("replay", "SKIP", "the bundle holds no data (--no-data): rebuild the shards to re-run")
        return
    rows = read_metrics(bundle)
    try:
        start = choose_start(index, rows, steps, from_step)
    except LlamalabError as e:
        report.add("replay", "FAIL", str(e))
        return
    meta = read_json(bundle.meta, what="run meta.json")
    recorded = {int(r["step"]): r for r in rows if "step" in r and start < int(r["step"]) <= start + steps}
    if not recorded:
        report.add("replay", "FAIL", f"{bundle.metrics}: no logged step after checkpoint {start}")
        return
    exact = device_type(device) == index.get("device_type", device_type(meta.get("device")))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="llamalab-verify-") as tmp:
        run = RunDir(Path(tmp) / "run")
        _copy_tree(bundle.checkpoint(start), run.checkpoint(start))
        _copy_tree(bundle.tokenizer_dir, run.tokenizer_dir)
        cfg = dict(meta["config"])
        cfg.update(data=str(bundle.data), run_dir=str(run.root), resume=True, stop_after=len(recorded),
                   report=False, tensorboard=False, device=device, peak_flops=meta.get("peak_flops") or 1.0)
        cfg_path = Path(tmp) / "replay_config.json"
        cfg_path.write_text(json.dumps(cfg), encoding="utf-8")
        rc = run_module("llamalab.commands.pretrain", ["--config", str(cfg_path)], "llamalab pretrain (replay)")
        if rc != 0:
            report.add("replay", "FAIL", f"re-running from checkpoints/step_{start:06d} failed (exit {rc})")
            return
        got = {int(r["step"]): r for r in read_metrics(run) if "step" in r}
    bad = []
    for s, want in sorted(recorded.items()):
        have = got.get(s)
        if have is None:
            bad.append(f"step {s}: not re-run")
            continue
        for k in REPLAYED:
            if k in want and not _same(want.get(k), have.get(k), exact):
                bad.append(f"step {s} {k}: recorded {want.get(k)!r}, re-run {have.get(k)!r}")
    how = "bit-exact" if exact else f"within {CROSS_DEVICE_RTOL:g} relative ({device_type(device)} vs " \
                                     f"{index.get('device_type')})"
    if bad:
        report.add("replay", "FAIL", f"metrics.jsonl vs re-run from step {start} ({how}): " + "; ".join(bad[:4]))
    else:
        report.add("replay", "PASS", f"steps {start + 1}-{max(recorded)} from checkpoints/step_{start:06d}: "
                                     f"{', '.join(k for k in REPLAYED if any(k in r for r in recorded.values()))} "
                                     f"{how} ({time.perf_counter() - t0:.1f}s)")


def verify_release(bundle: str | Path, *, steps: int = 2, from_step: int | None = None,
                   device: str = "cpu") -> VerifyReport:
    """Run every check on ``bundle``; the report's rows name each failing file."""
    root = Path(bundle)
    if not root.is_dir():
        raise LlamalabError(f"{root}: not a folder")
    if steps < 1:
        raise LlamalabError(f"--steps must be >= 1, got {steps}")
    report = VerifyReport()
    check_checksums(root, report)
    try:
        index = load_index(root)
    except LlamalabError as e:
        report.add("index", "FAIL", str(e))
        return report
    check_checkpoints(root, index, report)
    check_formats(root, index, report)
    try:
        check_replay(root, index, report, steps, from_step, device)
    except LlamalabError as e:
        report.add("replay", "FAIL", str(e))
    return report
