"""Data pipeline throughput: documents/s and MB/s per stage on the shared corpus, 1 vs 2 processes.

    python bench/data_pipeline.py [--shared ../shared/data] [--pages 1500] [--workers 1,2]

Part 1 times each cleaner / filter alone, in this process, on the same inputs the pipeline sees:
the Wikipedia dump (206 pages), the Stack Exchange dump, the 3 arXiv papers, and "web pages" cut
from Shakespeare (``--pages`` chunks of ~150 words; the shared data has no real crawl).
MB = UTF-8 bytes of the stage's input text. Part 2 runs the whole ``llamalab data clean`` on
wiki + arXiv + Stack Exchange + the web pages (reference corpus: the cleaned wiki text) with 1
and 2 local processes, per phase, and checks the outputs are byte-identical.
The peer (datatrove's Gopher, C4 and MinHash stages on the same documents) is in
``bench/data_vs_datatrove.py``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def timed(label: str, items: list, fn, rows: list) -> list:
    t0 = time.perf_counter()
    out = [fn(x) for x in items]
    dt = time.perf_counter() - t0
    mb = sum(len((x if isinstance(x, str) else x[0]).encode("utf-8")) for x in items) / 1e6
    rows.append((label, len(items), mb, dt))
    return out


def web_pages(shared: Path, n: int) -> list[str]:
    with gzip.open(shared / "corpus/shakespeare/shakespeare.txt.gz", "rt", encoding="utf-8") as f:
        words = f.read().split()
    return [" ".join(words[i:i + 150]) + "." for i in range(0, min(len(words), n * 150), 150)]


def part1(shared: Path, pages: list[str], tmp: Path) -> tuple[list, list[str]]:
    from llamalab.data import filters
    from llamalab.data.clean.arxiv import clean_latex
    from llamalab.data.clean.stackexchange import clean_thread, read_threads
    from llamalab.data.clean.web import WebConfig, clean_web
    from llamalab.data.clean.wiki import clean_wiki, read_dump
    from llamalab.data.dedup import Decontaminator, NearDupIndex, line_hashes

    rows: list = []
    wiki_docs = [d.text for d in read_dump(shared / "corpus/enwiki_markup.xml.bz2")]
    wiki = [r.text for r in timed("wiki: wikitext -> text", wiki_docs, clean_wiki, rows) if r.kept]
    se = list(read_threads(shared / "corpus/stackexchange/Posts.xml"))
    timed("stackexchange: threads", [(d.text, d) for d in se],
          lambda x: clean_thread(x[1].meta["question"], x[1].meta["answers"]), rows)
    tex = [p.read_text(encoding="utf-8") for p in sorted((shared / "corpus/arxiv").glob("*.tex"))]
    timed("arxiv: LaTeX rules", tex, clean_latex, rows)
    timed("web: C4 line rules", pages, filters.c4_lines, rows)
    t0 = time.perf_counter()
    filters._identifier()  # once per process: the model, its DFA window proof, float32 weights
    rows.append(("language id: load the model (once)", 0, 0.0, time.perf_counter() - t0))
    timed("web: language id", pages, filters.language_filter, rows)
    timed("web: Gopher rules", pages, filters.gopher_filter, rows)
    t0 = time.perf_counter()
    lm = filters.NgramLM().fit(wiki)
    fit = time.perf_counter() - t0
    rows.append(("perplexity LM: fit on wiki", len(wiki), sum(len(t.encode()) for t in wiki) / 1e6, fit))
    t0 = time.perf_counter()
    lm.log_prob("")  # builds the scoring tables (once per process)
    rows.append(("perplexity LM: build its scoring tables (once)", 0, 0.0, time.perf_counter() - t0))
    timed("web: perplexity", pages, lm.perplexity, rows)
    clf = filters.ReferenceClassifier().fit(wiki, pages[:200])
    timed("web: reference classifier", pages, clf.score, rows)
    timed("web: clean_web (all of the above)", pages,
          lambda p: clean_web(p, WebConfig(drop_buckets=[]), lm=lm, cutoffs=(1e9, 1e9), classifier=clf), rows)
    timed("dedup: normalised line hashes", pages, line_hashes, rows)
    idx = NearDupIndex()
    timed("dedup: MinHash LSH", [(p, i) for i, p in enumerate(pages)],
          lambda x: idx.check_and_add(str(x[1]), x[0]), rows)
    evals = [shared / "eval/gsm8k_test.jsonl.gz", shared / "eval/hellaswag_100.jsonl",
             shared / "eval/HumanEval.jsonl.gz"]
    dc = Decontaminator.from_files(evals)
    timed("decontam: 13-gram lookup", pages, dc.match, rows)
    return rows, wiki


def part2(shared: Path, pages: list[str], wiki: list[str], tmp: Path, workers: list[int]) -> list:
    from llamalab.data.clean.pipeline import DOCS, CleanSettings, SourceSpec, run_clean

    (tmp / "web").mkdir()
    for k in range(4):  # 4 files -> shards for the pool
        with open(tmp / "web" / f"part{k}.jsonl", "w") as f:
            f.writelines(json.dumps({"id": f"{k}-{i}", "text": p}) + "\n" for i, p in enumerate(pages[k::4]))
    (tmp / "ref.txt").write_text("\n\n".join(wiki), encoding="utf-8")
    sources = [SourceSpec("wikipedia", "wiki", [str(shared / "corpus/enwiki_markup.xml.bz2")]),
               SourceSpec("arxiv", "arxiv", [str(shared / "corpus/arxiv")]),
               SourceSpec("stackexchange", "stackexchange", [str(shared / "corpus/stackexchange")]),
               SourceSpec("web", "web", [str(tmp / "web")])]
    settings = CleanSettings(reference=[str(tmp / "ref.txt")], shard_docs=50, min_reference_score=0.0,
                             eval_files=[str(shared / "eval/gsm8k_test.jsonl.gz")])
    rows, outputs = [], []
    for w in workers:
        out = tmp / f"out{w}"
        t0 = time.perf_counter()
        led = run_clean(sources, settings, out, workers=w)
        dt = time.perf_counter() - t0
        timings = json.loads((out / "timings.json").read_text())
        rows.append((w, led.read, led.bytes_read / 1e6, dt, timings, led.kept))
        outputs.append({p.relative_to(out): p.read_bytes() for p in sorted((out / DOCS).rglob("*.jsonl"))})
    same = all(o == outputs[0] for o in outputs)
    return rows, same


def _spin(_: int) -> float:
    t0 = time.perf_counter()
    x = 0
    for i in range(3_000_000):
        x += i * i
    return time.perf_counter() - t0


def spare_cores() -> float:
    """Parallel speedup of a pure-CPU loop on 2 processes (2.0 = two idle cores; ~1 = none spare)."""
    import multiprocessing as mp

    one = _spin(0)
    with mp.get_context("fork").Pool(2) as pool:
        t0 = time.perf_counter()
        pool.map(_spin, [0, 1])
        two = time.perf_counter() - t0
    return 2 * one / two


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--pages", type=int, default=1500)
    ap.add_argument("--workers", default="1,2")
    args = ap.parse_args()
    shared = Path(args.shared)
    pages = web_pages(shared, args.pages)
    with tempfile.TemporaryDirectory() as tmp:
        rows, wiki = part1(shared, pages, Path(tmp))
        print("| stage (1 process) | docs | MB | s | docs/s | MB/s |\n|---|---|---|---|---|---|")
        for label, n, mb, dt in rows:
            if not n:  # a one-time setup step
                print(f"| {label} | | | {dt:.2f} | | |")
                continue
            print(f"| {label} | {n} | {mb:.2f} | {dt:.2f} | {n / dt:,.0f} | {mb / dt:.2f} |")
        runs, same = part2(shared, pages, wiki, Path(tmp), [int(w) for w in args.workers.split(",")])
    print("\n| `data clean`, processes | docs read | MB | total s | docs/s | MB/s | plan | models | line hashes "
          "| clean | dedup | kept |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for w, n, mb, dt, t, kept in runs:
        print(f"| {w} | {n} | {mb:.2f} | {dt:.1f} | {n / dt:,.0f} | {mb / dt:.2f} | {t['plan']:.1f} | "
              f"{t['models']:.1f} | {t['line_hashes']:.1f} | {t['clean']:.1f} | {t['dedup']:.1f} | {kept} |")
    print(f"\noutputs byte-identical across process counts: {same}")
    print(f"machine check: a pure-CPU loop on 2 processes runs {spare_cores():.2f}x one process "
          f"(2.0 = two idle cores); load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
