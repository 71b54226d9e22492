"""The model card of a release bundle: ``README.md`` with Hugging Face model-card front matter, written
only from the run's records (meta.json, metrics.jsonl, data/manifest.json, summary.json, eval/), so
no number in it is typed by hand. Sections a run has no record for say "not run"."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llamalab.common import read_json
from llamalab.run_dir import RunDir

CURVES = "curves.json"  # eval/curves.json (llamalab.eval.sweep)
MEMORIZATION = "memorization.json"  # eval/memorization.json (llamalab.eval.memorization)
NOT_RUN = "not run"


def card_numbers(run: RunDir) -> dict[str, Any]:
    """The headline numbers the card states, read from the records (also what tests compare against)."""
    from llamalab.release.bundle import read_metrics

    meta = read_json(run.meta, what="run meta.json")
    rows = read_metrics(run)
    steps = [r for r in rows if "step" in r]
    vals = [r for r in steps if r.get("val_loss") is not None]
    return {"n_params": int(meta["n_params"]) if meta.get("n_params") is not None else None,
            "steps": int(steps[-1]["step"]) if steps else 0,
            "tokens_seen": int(steps[-1]["tokens_seen"]) if steps else 0,
            "final_loss": steps[-1]["loss"] if steps else None,
            "val_loss": vals[-1]["val_loss"] if vals else None,
            "val_step": int(vals[-1]["step"]) if vals else None}


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _front_matter(meta: dict[str, Any], manifest: dict[str, Any], has_eval: bool) -> str:
    sources = sorted((manifest.get("tokens_by_source") or {}).keys())
    lines = ["---", "license: other", "license_name: see-data-sources", "library_name: llamalab",
             "pipeline_tag: text-generation", "tags:", "  - llamalab", "  - llama", "  - llm360",
             "  - pretraining", "  - reproducible"]
    lines += ["datasets:"] + [f"  - {json.dumps(s)}" for s in sources] if sources else ["datasets: []"]
    lines += ["metrics:", "  - loss", "  - perplexity"] + (["  - bits_per_byte"] if has_eval else [])
    lines += ["---", ""]
    return "\n".join(lines)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    return out


def render_card(run: RunDir, index: dict[str, Any]) -> str:
    """The card as markdown (front matter first)."""
    meta = read_json(run.meta, what="run meta.json")
    manifest = read_json(run.manifest, what="data manifest") if run.manifest.exists() else {}
    summary = read_json(run.summary, what="run summary.json") if run.summary.exists() else {}
    curves = read_json(run.eval_file(CURVES), what="eval curves") if run.eval_file(CURVES).exists() else None
    memo = read_json(run.eval_file(MEMORIZATION), what="memorization") if run.eval_file(MEMORIZATION).exists() else None
    n = card_numbers(run)
    model, plan, cfg = meta.get("model") or {}, meta.get("plan") or {}, meta.get("config") or {}
    name = index.get("run") or run.root.name
    L: list[str] = [_front_matter(meta, manifest, curves is not None), f"# {name}", ""]
    L += ["A LLaMA-architecture language model pretrained with llamalab, released LLM360-style: final weights "
          "(llamalab, Hugging Face and GGUF form), every kept checkpoint, the data and the order it was read in, "
          "the config, the logs and the evaluation. Everything below is written from the run's own records.", ""]
    L += ["## Model", "", f"- parameters: **{_fmt(n['n_params'])}**",
          f"- tokens seen: **{_fmt(n['tokens_seen'])}** in {_fmt(n['steps'])} optimizer steps",
          f"- final training loss: {_fmt(n['final_loss'])}",
          f"- final validation loss: **{_fmt(n['val_loss'])}** (step {_fmt(n['val_step'])})", ""]
    L += _table(["field", "value"], [[k, v] for k, v in model.items()]) + [""]
    L += ["## Files", "", "| what | where |", "|---|---|"]
    fm = index.get("formats") or {}
    L += [f"| llamalab model folder | `{fm.get('llamalab')}/` |",
          f"| Hugging Face (transformers) | `{fm.get('hf')}/` |"]
    if fm.get("gguf"):
        L.append(f"| GGUF ({fm.get('gguf_type')}) | `{fm['gguf']}` |")
    L += ["| checkpoints (model/, optimizer, RNG, data position) | `checkpoints/step_N/` |",
          "| records | `meta.json`, `metrics.jsonl`, `logbook.jsonl`, `report.html`, `eval/` |",
          "| checksums of every file | `checksums.sha256` |", ""]
    L += ["## Checkpoints", ""]
    L += _table(["step", "tokens seen", "val loss", "weights sha256"],
                [[c["step"], c["tokens_seen"], c["val_loss"], f"`{c['sha256']}`"]
                 for c in index.get("checkpoints", [])])
    L += [""]
    data = index.get("data") or {}
    L += ["## Data", "", f"- documents: {_fmt(manifest.get('n_documents'))}, bytes: {_fmt(manifest.get('n_bytes'))}, "
          f"tokens: {_fmt((manifest.get('n_tokens') or {}).get('train'))} train / "
          f"{_fmt((manifest.get('n_tokens') or {}).get('val'))} validation",
          f"- tokenizer: sha256 `{(manifest.get('tokenizer') or {}).get('sha256')}`, "
          f"vocabulary {_fmt(manifest.get('vocab_size'))}",
          f"- manifest sha256: `{data.get('manifest_sha256')}`",
          f"- the shards are {'in `data/`' if data.get('included') else 'NOT included (rebuild them; hashes below)'}; "
          f"`data/steps.json` maps every step to the shard token ranges it read"
          + ("" if data.get("steps_map") else " (not written: the run's shard folder was gone)"), ""]
    total = sum((manifest.get("tokens_by_source") or {}).values()) or 1
    L += _table(["source", "tokens", "share"], [[s, int(t), f"{t / total:.1%}"]
                                                for s, t in sorted((manifest.get("tokens_by_source") or {}).items())])
    L += [""] + _table(["shard", "split", "tokens", "sha256"],
                       [[s["file"], s.get("split"), s.get("n_tokens"), f"`{s.get('sha256')}`"]
                        for s in data.get("shards", [])]) + [""]
    opt = cfg.get("optim") or {}
    L += ["## Training recipe", "",
          f"- {plan.get('steps')} steps x {plan.get('global_seqs')} sequences x {plan.get('seq_len')} tokens "
          f"(micro batch {plan.get('micro')}, accumulation {plan.get('accum')}, world size {meta.get('world_size')})",
          f"- AdamW ({opt.get('beta1')}, {opt.get('beta2')}), peak lr {plan.get('peak_lr')}, "
          f"warmup {plan.get('warmup')} "
          f"steps then cosine to {opt.get('min_lr_ratio')} of the peak, weight decay {opt.get('weight_decay')}, "
          f"clip {opt.get('grad_clip')}",
          f"- seed {cfg.get('seed')}, device {meta.get('device')}, dtype {meta.get('dtype')}, "
          f"strategy {meta.get('strategy')}",
          f"- llamalab {(meta.get('versions') or {}).get('llamalab')}, git {meta.get('git_sha')}; "
          f"torch {(meta.get('versions') or {}).get('torch')}",
          "- the full resolved config is `meta.json` -> `config`", ""]
    L += ["## Compute, energy, carbon", ""]
    energy = summary.get("energy") if isinstance(summary, dict) else None
    flops = (meta.get("flops_per_token") or 0) * n["tokens_seen"]
    L.append(f"- training FLOPs (6N + attention, per token x tokens): {flops:.3e}")
    if energy:
        L.append(f"- energy: {_fmt(energy.get('kwh'), 6)} kWh ({_fmt(energy.get('device_power_watts'), 0)} W x "
                 f"{_fmt(energy.get('hours'), 4)} h x PUE {energy.get('pue')}); "
                 f"carbon: {_fmt(energy.get('kg_co2eq'), 6)} "
                 f"kg CO2eq at {energy.get('carbon_intensity_kg_per_kwh')} kg/kWh (an estimate, not a measurement)")
    else:
        L.append(f"- energy and carbon: {NOT_RUN} (no summary.json; `llamalab run` writes one)")
    L += ["", "## Evaluation", ""]
    if curves:
        rows = []
        for task, metrics in sorted(curves.items()):
            for m, pts in metrics.items():
                if pts:
                    rows.append([task, m, pts[0].get("value"), pts[-1].get("value"), len(pts)])
        L += ["Every checkpoint was evaluated (`eval/curves.json`; values at the first and last checkpoint):", ""]
        L += _table(["task", "metric", "first", "last", "checkpoints"], rows)
    else:
        L.append(f"Checkpoint sweep: {NOT_RUN} (`llamalab eval sweep RUN` writes `eval/curves.json`).")
    L += ["", "## Memorization", ""]
    if memo:
        L.append(f"k={memo.get('k')} prompt tokens, l={memo.get('l')} continuation tokens, "
                 f"{memo.get('n_sequences')} training sequences in {len(memo.get('chunks', []))} data chunks:")
        L.append("")
        rows = [[c.get("step"), c.get("tokens_seen")] + [c.get(k) for k in ("score", "exact")]
                for c in memo.get("checkpoints", [])]
        L += _table(["step", "tokens seen", "mean score", "exactly extractable"], rows)
    else:
        L.append(f"{NOT_RUN} (`llamalab eval memorization RUN` writes `eval/memorization.json`).")
    L += ["", "## Known limits", "",
          "- a research artifact: small, trained on little data; it is not instruction-tuned nor safety-tested and "
          "will produce wrong, repetitive or offensive text;",
          "- energy and carbon are estimates from device power x time, not meter readings;",
          f"- losses re-run bit-exact only on the same device type ({index.get('device_type')}) and library versions; "
          "other devices agree within the tolerance `llamalab release verify` states;",
          "- the licence of the weights follows the licences of the data sources listed above.", ""]
    L += ["## How to reproduce", "", "```bash",
          "sha256sum -c checksums.sha256                 # every file as released",
          "llamalab release verify .                     # checksums, formats, a re-run slice of training",
          "llamalab data which-step . 1                  # which documents step 1 read",
          "llamalab pretrain data --config train_config.json   # after: python -c 'import json; "
          "json.dump(json.load(open(\"meta.json\"))[\"config\"], open(\"train_config.json\", \"w\"))'",
          "llamalab generate model --prompt 'The '",
          "```", "",
          "`transformers`: `AutoModelForCausalLM.from_pretrained(\"hf\")`; llama.cpp: `model.gguf`.", ""]
    return "\n".join(L)


def write_card(run: RunDir, index: dict[str, Any]) -> Path:
    from llamalab.release.bundle import CARD

    path = Path(run.root) / CARD
    path.write_text(render_card(run, index), encoding="utf-8")
    return path
