"""Write a run's ``report.html``: plots, the data mixture, config, samples, compute and energy.

One self-contained HTML file (plots embedded as PNG data URIs, no CDN), built only from the run's
record (``meta.json``, ``metrics.jsonl``, ``logbook.jsonl``, ``data/manifest.json``,
``summary.json``, ``samples.json``, ``sft_data.json``, ``eval/``; paths from
:class:`~llamalab.run_dir.RunDir`), so ``llamalab report RUN`` can rebuild it at any time.
Plots need matplotlib (the ``report`` extra); without it the report says so and keeps the tables.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from llamalab.common import LlamalabError, print0
from llamalab.run_dir import RunDir

FIGURES_INDEX = "figures.json"  # written by eval sweep / memorization: figure captions

def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


STANDARD_METRICS = {"step", "loss", "lr", "grad_norm", "tokens_seen", "tokens_per_s", "mfu", "batch", "step_time",
                    "elapsed", "loss_scale", "overflow"}


def extra_metrics(rows: list[dict]) -> list[str]:
    """Numeric metrics.jsonl keys beyond the loop's own (a loss_fn's statistics), each once, ``val_`` folded in."""
    seen: dict[str, None] = {}
    for r in rows:
        for k, v in r.items():
            name = k[4:] if k.startswith("val_") else k
            if name not in STANDARD_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool):
                seen.setdefault(name)
    return list(seen)


def training_plots(rows: list[dict]) -> list[tuple[str, str]]:
    """(title, data URI) for loss, learning rate, gradient norm and throughput."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    if not rows:
        return []
    steps = [r["step"] for r in rows]
    out = []
    panels = [
        ("Loss", [("train", "loss"), ("validation", "val_loss")], "nats / token"),
        ("Learning rate", [("lr", "lr")], "lr"),
        ("Gradient norm (before clipping)", [("grad norm", "grad_norm")], "L2 norm"),
        ("Throughput", [("tokens/s", "tokens_per_s")], "tokens / s"),
        ("Model FLOPs utilisation", [("MFU", "mfu")], "fraction of measured peak"),
    ]
    panels += [(k.replace("_", " ").capitalize(), [("train", k), ("validation", f"val_{k}")], k)
               for k in extra_metrics(rows)]  # a loss_fn's statistics: preference accuracy, margins, KL ...
    for title, series, ylabel in panels:
        if not any(r.get(key) is not None for _, key in series for r in rows):
            continue  # e.g. no MFU when no peak was measured
        fig, ax = plt.subplots(figsize=(6.4, 3.2))
        for label, key in series:
            pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), label=label, marker="o" if key.startswith("val_") else None, markersize=3)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend()
        ax.set_xlim(min(steps), max(steps))
        out.append((title, _png(fig)))
        plt.close(fig)
    return out


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    h = "".join(f"<th>{html.escape(str(x))}</th>" for x in headers)
    b = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{h}</tr>{b}</table>"


def mixture_table(manifest: dict | None, summary: dict | None) -> str:
    if not manifest:
        return "<p>No manifest.</p>"
    toks = manifest.get("tokens_by_source", {})
    total = sum(toks.values()) or 1
    corpus = (summary or {}).get("corpus", {})
    docs, by = corpus.get("documents_by_source", {}), corpus.get("bytes_by_source", {})
    rows = [[src, f"{docs.get(src, '')}", f"{by.get(src, 0) / 1e6:.2f}" if src in by else "",
             f"{n:,}", f"{n / total:.1%}"] for src, n in sorted(toks.items(), key=lambda kv: -kv[1])]
    return _table(["source", "documents", "MB", "tokens", "share"], rows)


def sft_data_table(d: dict) -> str:
    """The SFT ledger: records read, kept and dropped by reason, fixes, tokens and packing."""
    rows = [["records read", f"{d.get('read', 0):,}"], ["records kept", f"{d.get('kept', 0):,}"],
            ["examples (after splitting)", f"{d.get('examples', 0):,}"]]
    rows += [[f"dropped: {k}", f"{v:,}"] for k, v in sorted(d.get("dropped", {}).items())]
    rows += [[f"fixed: {k}", f"{v:,}"] for k, v in sorted(d.get("fixes", {}).items())]
    rows += [["tokens / trained on (assistant)", f"{d.get('tokens', 0):,} / {d.get('loss_tokens', 0):,}"],
             ["rows x seq_len", f"{d.get('rows', 0):,} x {d.get('seq_len', 0)}"],
             ["packing, fill", f"{d.get('packing')}, {d.get('fill', 0):.0%}"], ["chat template", d.get("template", "")]]
    return _table(["", "value"], rows)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def eval_images(run: RunDir) -> list[tuple[str, str]]:
    """Figures written by ``eval sweep`` / ``eval memorization`` into RUN/eval/ (captions from figures.json)."""
    folder = run.eval
    if not folder.exists():
        return []
    captions: dict[str, str] = {}
    index = _read_json(run.eval_file(FIGURES_INDEX)) or {}
    for figs in index.values():
        for f in figs if isinstance(figs, list) else []:
            if isinstance(f, dict) and "path" in f:
                captions[Path(f["path"]).name] = f.get("caption", "")
    return [(captions.get(p.name) or p.stem.replace("_", " "),
             "data:image/png;base64," + base64.b64encode(p.read_bytes()).decode())
            for p in sorted(folder.glob("*.png"))]


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{margin-bottom:.2em} .sub{color:#666} .grid{display:grid;grid-template-columns:1fr 1fr;gap:1em}
img{max-width:100%;border:1px solid #eee} table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left;font-size:.92em} th{background:#f5f5f5}
pre{background:#f7f7f7;padding:.8em;overflow-x:auto;font-size:.85em} .kpi{display:flex;gap:2em;flex-wrap:wrap}
.kpi div{background:#f3f6fb;padding:.6em 1em;border-radius:6px} .kpi b{display:block;font-size:1.3em}"""


def write_report(run_dir: str | Path) -> Path:
    """Write ``report.html`` into the run folder ``run_dir`` (pretraining or SFT) and return its path."""
    run = RunDir(run_dir)
    meta = _read_json(run.meta)
    if meta is None:
        raise LlamalabError(f"{run.root}: not a run folder (no {run.meta.name})")
    rows = _read_jsonl(run.metrics)
    summary = _read_json(run.summary) or {}
    samples = _read_json(run.samples) or summary.get("samples", [])
    manifest = _read_json(run.manifest)
    logbook = _read_jsonl(run.logbook)
    plots = training_plots(rows)
    last = rows[-1] if rows else {}
    vals = [r["val_loss"] for r in rows if r.get("val_loss") is not None]
    tokens = last.get("tokens_seen", 0)
    flops = meta.get("flops_per_token", 0) * tokens
    energy = summary.get("energy")
    mfus = [r["mfu"] for r in rows if r.get("mfu") is not None]
    kpis = [("steps", last.get("step", 0)), ("tokens seen", f"{tokens:,}"),
            ("final train loss", _fmt(last.get("loss"))),
            ("validation loss", _fmt(vals[-1]) if vals else "n/a"),
            ("unigram entropy", _fmt(summary.get("unigram_entropy", "n/a"))),
            ("parameters", f"{meta.get('n_params', 0):,}"), ("train FLOPs", f"{flops:.3g}"),
            ("mean MFU", f"{sum(mfus) / len(mfus):.1%}" if mfus else "n/a")]
    parts = [f"<h1>llamalab run: {html.escape(run.root.name)}</h1>",
             f"<p class=sub>git {html.escape(str(meta.get('git_sha')))} &middot; {html.escape(meta.get('device', ''))} "
             f"{html.escape(meta.get('dtype', ''))} &middot; world size {meta.get('world_size', 1)}</p>",
             "<div class=kpi>" + "".join(f"<div>{html.escape(k)}<b>{html.escape(str(v))}</b></div>" for k, v in kpis)
             + "</div>", "<h2>Training</h2>"]
    if plots:
        parts.append("<div class=grid>" + "".join(f'<figure><img alt="{html.escape(t)}" src="{u}"><figcaption>'
                                                  f'{html.escape(t)}</figcaption></figure>' for t, u in plots)
                     + "</div>")
    else:
        parts.append("<p>(plots need matplotlib: pip install 'llamalab[report]')</p>")
    evimgs = eval_images(run)
    if evimgs:
        parts.append("<h2>Evaluations of every checkpoint</h2><div class=grid>" + "".join(
            f'<figure><img alt="{html.escape(t)}" src="{u}"><figcaption>{html.escape(t)}</figcaption></figure>'
            for t, u in evimgs) + "</div>")
    sft_data = _read_json(run.sft_data)
    pref = _read_json(run.preference_data)  # reward model, DPO: the pair ledger
    if sft_data and not manifest:
        parts += ["<h2>Fine-tuning data</h2>", sft_data_table(sft_data)]
    elif pref and not manifest:
        parts += ["<h2>Preference data</h2>", _table(["", "value"], [
            [k, _fmt(v)] for k, v in pref.items() if not isinstance(v, (dict, list))] + [
            [f"{k}: {r}", f"{n:,}"] for k in ("dropped", "fixes") for r, n in sorted(pref.get(k, {}).items())])]
    else:
        parts += ["<h2>Data mixture</h2>", mixture_table(manifest, summary)]
    if manifest:
        parts.append(f"<p>{manifest['n_tokens']['train']:,} training and {manifest['n_tokens']['val']:,} validation "
                     f"tokens in {len(manifest['shards'])} shards; "
                     f"validation split: {html.escape(manifest['val_split'])}."
                     f" Tokenizer sha256 {manifest['tokenizer']['sha256'][:16]}…</p>")
    dropped = summary.get("corpus", {}).get("dropped")
    if dropped:
        parts.append("<p>Dropped while reading: " + html.escape(", ".join(f"{k}: {v}" for k, v in dropped.items()))
                     + "</p>")
    if samples:
        parts.append("<h2>Samples</h2>" + "".join(
            f"<pre><b>{html.escape(s['prompt'])}</b>{html.escape(s['completion'])}</pre>" for s in samples))
    parts.append("<h2>Compute and energy</h2>")
    comp = [["FLOPs per token (6N + 12·L·H·Dh·T)", f"{meta.get('flops_per_token', 0):.4g}"],
            ["total training FLOPs", f"{flops:.4g}"],
            ["measured matmul peak", f"{meta.get('peak_flops', 0):.4g} FLOP/s"]]
    if energy:
        comp += [["device power (W)", _fmt(energy["device_power_watts"])], ["hours", _fmt(energy["hours"])],
                 ["PUE", _fmt(energy["pue"])], ["energy (kWh) = W × h × PUE / 1000", _fmt(energy["kwh"])],
                 ["grid intensity (kg CO2eq/kWh)", _fmt(energy["carbon_intensity_kg_per_kwh"])],
                 ["emissions (kg CO2eq)", _fmt(energy["kg_co2eq"])]]
    parts.append(_table(["quantity", "value"], comp))
    parts.append("<p>As in the LLaMA and OPT papers: energy = device power × hours × PUE, carbon = energy × grid "
                 "intensity; each factor is a documented parameter of <code>llamalab run</code>.</p>")
    if logbook:
        parts.append("<h2>Logbook</h2>" + _table(["event", "details"], [
            [e["event"], ", ".join(f"{k}={_fmt(v)}" for k, v in e.items() if k not in ("event", "time"))]
            for e in logbook]))
    parts.append("<h2>Config</h2><pre>" + html.escape(json.dumps(
        {k: meta[k] for k in ("config", "model", "plan", "data", "versions") if k in meta}, indent=2)) + "</pre>")
    page = f"<!doctype html><html><head><meta charset=utf-8><title>llamalab: {html.escape(run.root.name)}</title>" \
           f"<style>{CSS}</style></head><body>{''.join(parts)}</body></html>"
    out = run.report
    tmp = out.with_suffix(".html.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    return out


def refresh_report(run_dir: str | Path) -> Path | None:
    """Rebuild the report of a run folder after new evaluations (no-op for a folder without meta.json)."""
    if not RunDir(run_dir).meta.exists():
        return None
    out = write_report(run_dir)
    print0(f"report updated: {out}")
    return out
