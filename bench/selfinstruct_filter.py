"""Self-Instruct's ROUGE-L filter: new instructions/s against 10k kept ones, llamalab's RougeIndex vs rouge-score.

The peer is what Alpaca's ``generate_instruction.py`` does: kept instructions tokenized once by
rouge-score's tokenizer, then ``RougeScorer._score_lcs(new, kept)`` for every kept one (its O(m*n)
Python table), here in one process. Ours is :class:`llamalab.synth.rouge.RougeIndex` (bit-parallel
LCS over all kept rows at once with numpy), both with every score computed (``min_score=0``) and with
the length bound Self-Instruct's 0.7 threshold allows (``min_score=0.7``, what ``llamalab
selfinstruct`` runs). Every score of ours is checked equal to the peer's on the queries the peer ran.

Kept set: real instructions, the 5,000 of ../shared/data/sft/alpaca_5000.json.gz minus the queries,
the 175 seed tasks, and sentences of Alpaca outputs (up to 3 per output) up to 10,000 texts. Queries: the last 200
Alpaca instructions. Usage::

    python bench/selfinstruct_filter.py [--kept 10000] [--queries 200] [--peer-queries 8]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("LLAMALAB_SHARED", ROOT.parent / "shared")) / "data"


def load(n_kept: int, n_queries: int) -> tuple[list[str], list[str]]:
    with gzip.open(SHARED / "sft/alpaca_5000.json.gz", "rt", encoding="utf-8") as f:
        alpaca = json.load(f)
    queries = [r["instruction"] for r in alpaca[-n_queries:]]
    kept = [r["instruction"] for r in alpaca[:-n_queries]]
    with open(SHARED / "selfinstruct/seed_tasks.jsonl", encoding="utf-8") as f:
        kept += [json.loads(line)["instruction"] for line in f if line.strip()]
    for r in alpaca:
        if len(kept) >= n_kept:
            break
        kept += [s for s in re.split(r"(?<=[.!?])\s+", r["output"].strip()) if 3 < len(s.split()) <= 40][:3]
    return kept[:n_kept], queries


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kept", type=int, default=10_000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--peer-queries", type=int, default=8)
    args = ap.parse_args()

    from rouge_score import rouge_scorer

    from llamalab.synth.rouge import RougeIndex

    kept, queries = load(args.kept, args.queries)
    print(f"kept {len(kept)} instructions, {len(queries)} queries; torch-free, numpy, 1 process")

    t0 = time.perf_counter()
    index = RougeIndex(kept)
    build = time.perf_counter() - t0

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    t0 = time.perf_counter()
    kept_tokens = [scorer._tokenizer.tokenize(t) for t in kept]
    peer_build = time.perf_counter() - t0

    peer_scores = []
    t0 = time.perf_counter()
    for q in queries[:args.peer_queries]:
        qt = scorer._tokenizer.tokenize(q)
        peer_scores.append([rouge_scorer._score_lcs(qt, kt).fmeasure for kt in kept_tokens])
    peer_rate = args.peer_queries / (time.perf_counter() - t0)

    rates = {}
    for min_score in (0.0, 0.7):
        t0 = time.perf_counter()
        for q in queries:
            index.best(q, min_score)
        rates[min_score] = len(queries) / (time.perf_counter() - t0)

    mismatches = 0
    for q, ref in zip(queries, peer_scores):
        idx, f = index.scores(q)
        got = dict(zip(idx.tolist(), f.tolist()))
        mismatches += sum(got.get(i, 0.0) != r for i, r in enumerate(ref))
    print(f"equal scores: {len(peer_scores) * len(kept) - mismatches}/{len(peer_scores) * len(kept)}")
    print(f"build: ours {build:.2f} s (tokenize + index), peer {peer_build:.2f} s (tokenize)")
    print(f"rouge-score (Alpaca's loop)      {peer_rate:10.2f} instructions/s")
    print(f"llamalab RougeIndex, all scores  {rates[0.0]:10.1f} instructions/s  ({rates[0.0] / peer_rate:.0f}x)")
    print(f"llamalab RougeIndex, bound 0.7   {rates[0.7]:10.1f} instructions/s  ({rates[0.7] / peer_rate:.0f}x)")
    if mismatches:
        raise SystemExit(f"{mismatches} scores differ from rouge-score")


if __name__ == "__main__":
    main()
