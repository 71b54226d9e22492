"""llamalab's data filters beside datatrove's (HuggingFace's data pipeline, the FineWeb one) on the
same documents, in one process, alternating rounds: Gopher quality, C4 quality, MinHash dedup.

    pip install -e ".[data,bench]"    # datatrove 0.10, spacy (its English word tokenizer), xxhash
    nice -n 5 python bench/data_vs_datatrove.py [--shared ../shared/data] [--pages 1500] [--wiki 40] [--rounds 2]

Documents: the web pages ``bench/data_pipeline.py`` cuts from the shared Shakespeare text (~150
words, one line each), the first ``--wiki`` cleaned articles of the shared Wikipedia dump
(multi-line, long), and for MinHash the pages plus edited copies of a third of them (1, 2, 4 or 8
words replaced: Jaccard of 5-shingles ~0.93 down to ~0.6). Per stage and per side: the best round of
``--rounds`` (the machine is shared: best-of is the least disturbed), documents/s and MB/s
(UTF-8 bytes of the input text), and ours/theirs. Every call runs on one core (BLAS pinned to 1
thread). Then which documents each side keeps or drops, with the reasons where they disagree.

What is timed, per side:
- Gopher: ``filters.gopher_filter(text)`` vs ``GopherQualityFilter().filter(doc)`` (both defaults,
  which are Gopher's published thresholds on both sides).
- C4: ``filters.c4_lines`` then ``filters.c4_doc_filter`` (``min_sentences=5``: C4's value, which
  datatrove uses; our default is 3) vs ``C4QualityFilter().filter(doc)`` (its defaults).
- MinHash: our ``NearDupIndex`` (signature, LSH, Jaccard check, one pass) vs datatrove's four
  stages (signatures -> buckets -> clusters -> filter, with their files in a temporary folder),
  both 5-word shingles and 9 bands x 13 rows (the bands datasketch picks for threshold 0.8 and
  128 permutations; datatrove's default is 14 x 8). Also datatrove's signature stage alone.
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # datatrove's MinHash stages draw progress bars

import argparse  # noqa: E402
import gzip  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def web_pages(shared: Path, n: int) -> list[str]:
    with gzip.open(shared / "corpus/shakespeare/shakespeare.txt.gz", "rt", encoding="utf-8") as f:
        words = f.read().split()
    return [" ".join(words[i:i + 150]) + "." for i in range(0, min(len(words), n * 150), 150)]


def near_copies(pages: list[str], seed: int = 0) -> list[tuple[str, int]]:
    """An edited copy of every third page: (text, words replaced), 1, 2, 4 or 8 words."""
    rng = random.Random(seed)
    out = []
    for i, p in enumerate(pages[::3]):
        ws = p.split()
        k = (1, 2, 4, 8)[i % 4]
        for j in rng.sample(range(len(ws)), k):
            ws[j] = f"zq{rng.randrange(10**6)}"
        out.append((" ".join(ws), k))
    return out


def mb(texts: list[str]) -> float:
    return sum(len(t.encode("utf-8")) for t in texts) / 1e6


def best_of(rounds: int, sides: dict) -> dict:
    """{side: (best seconds, result of the last round)}, the sides alternating within each round."""
    best = {k: float("inf") for k in sides}
    result = {}
    for r in range(rounds):
        for name in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
            setup, fn = sides[name]
            arg = setup()
            t0 = time.perf_counter()
            result[name] = fn(arg)
            best[name] = min(best[name], time.perf_counter() - t0)
    return {k: (best[k], result[k]) for k in sides}


# ----------------------------------------------------------------------------- stages


def ours_gopher(texts):
    from llamalab.data import filters

    return [filters.gopher_filter(t) for t in texts]


def theirs_gopher(docs):
    from datatrove.pipeline.filters import GopherQualityFilter

    f = GopherQualityFilter()
    return [_reason(f.filter(d)) for d in docs]


def ours_c4(texts):
    from llamalab.data import filters

    cfg = filters.HeuristicConfig(min_sentences=5)
    out = []
    for t in texts:
        kept, _ = filters.c4_lines(t, cfg)
        if not kept.strip():
            out.append(("c4:no_lines_left", None))
            continue
        reason = filters.c4_doc_filter(kept, cfg)
        out.append((reason, kept if reason is None else None))
    return out


def theirs_c4(docs):
    from datatrove.pipeline.filters import C4QualityFilter

    f = C4QualityFilter()
    out = []
    for d in docs:
        reason = _reason(f.filter(d))
        out.append((reason, d.text if reason is None else None))
    return out


def _lines(text: str) -> list[str]:
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


def _reason(res) -> str | None:
    if res is True:
        return None
    return res[1] if isinstance(res, tuple) else "dropped"


def ours_minhash(texts):
    from llamalab.data.dedup import NearDupIndex

    idx = NearDupIndex(threshold=0.8, num_perm=128, k=5)
    return {i for i, t in enumerate(texts) if idx.check_and_add(str(i), t)}


def _dt_config():
    from datatrove.pipeline.dedup.minhash import MinhashConfig

    return MinhashConfig(n_grams=5, num_buckets=9, hashes_per_bucket=13)


def theirs_minhash(docs, signatures_only: bool = False):
    from datatrove.pipeline.dedup.minhash import (
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )

    cfg = _dt_config()
    with tempfile.TemporaryDirectory() as tmp:
        MinhashDedupSignature(output_folder=f"{tmp}/sigs", config=cfg).run(iter(docs), rank=0, world_size=1)
        if signatures_only:
            return None
        for b in range(cfg.num_buckets):
            _drain(MinhashDedupBuckets(input_folder=f"{tmp}/sigs", output_folder=f"{tmp}/buckets", config=cfg)
                   .run(rank=b, world_size=cfg.num_buckets))
        _drain(MinhashDedupCluster(input_folder=f"{tmp}/buckets", output_folder=f"{tmp}/remove", config=cfg).run())
        kept = MinhashDedupFilter(input_folder=f"{tmp}/remove").run(iter(docs), rank=0, world_size=1)
        kept_ids = {d.id for d in kept}
    return {i for i, d in enumerate(docs) if d.id not in kept_ids}


def _drain(x) -> None:
    if x is not None and hasattr(x, "__next__"):
        for _ in x:
            pass


# ----------------------------------------------------------------------------- report


def row(stage: str, texts: list[str], res: dict) -> str:
    (ts, _), (tt, _) = res["ours"], res["theirs"]
    n, m = len(texts), mb(texts)
    return (f"| {stage} | {n} | {m:.2f} | {n / ts:,.0f} | {n / tt:,.0f} | {m / ts:.2f} | {m / tt:.2f} | "
            f"**{tt / ts:.1f}x** |")


def agreement(name: str, ours: list, theirs: list) -> list[str]:
    both_keep = sum(a is None and b is None for a, b in zip(ours, theirs))
    both_drop = sum(a is not None and b is not None for a, b in zip(ours, theirs))
    only_ours = Counter(a for a, b in zip(ours, theirs) if a is not None and b is None)
    only_theirs = Counter(b for a, b in zip(ours, theirs) if a is None and b is not None)
    lines = [f"- {name}: both keep {both_keep}, both drop {both_drop}; "
             f"only we drop {sum(only_ours.values())} ({_fmt(only_ours)}); "
             f"only datatrove drops {sum(only_theirs.values())} ({_fmt(only_theirs)})"]
    pairs = Counter((a, b) for a, b in zip(ours, theirs) if a is not None and b is not None)
    if pairs:
        lines.append(f"  - both drop, reasons (ours, theirs): {_fmt(pairs)}")
    return lines


def _fmt(c: Counter) -> str:
    return ", ".join(f"{k} {v}" for k, v in c.most_common(6)) or "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--pages", type=int, default=1500)
    ap.add_argument("--wiki", type=int, default=40, help="cleaned Wikipedia articles (datatrove's C4 runs ~10/s)")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    try:
        import datatrove.pipeline.dedup.minhash  # noqa: F401  # optional extra: llamalab[bench]
        import datatrove.pipeline.filters  # noqa: F401
        from loguru import logger
    except ImportError:
        sys.exit("datatrove is not installed: pip install -e '.[bench]'")
    logger.remove()  # datatrove logs every stage at INFO (its handler is added on import)
    from datatrove.data import Document

    from llamalab.data.clean.wiki import clean_wiki, read_dump

    shared = Path(args.shared)
    pages = web_pages(shared, args.pages)
    wiki = [r.text for r in (clean_wiki(d.text) for d in read_dump(shared / "corpus/enwiki_markup.xml.bz2")) if r.kept]
    wiki = wiki[:args.wiki]
    copies = near_copies(pages)
    dedup_texts = pages + [t for t, _ in copies]
    load0 = os.getloadavg()

    def docs(texts):
        return lambda: [Document(text=t, id=str(i)) for i, t in enumerate(texts)]

    theirs_gopher(docs(["warm up the spacy tokenizer. " * 20])())  # first call loads spacy (~1 s)
    theirs_c4(docs(["warm up the spacy sentencizer. " * 20])())
    rows, notes = [], []
    for label, texts in (("web pages", pages), ("wiki articles", wiki)):
        g = best_of(args.rounds, {"ours": (lambda t=texts: t, ours_gopher), "theirs": (docs(texts), theirs_gopher)})
        rows.append(row(f"Gopher quality, {label}", texts, g))
        notes += agreement(f"Gopher, {label}", g["ours"][1], g["theirs"][1])
        c = best_of(args.rounds, {"ours": (lambda t=texts: t, ours_c4), "theirs": (docs(texts), theirs_c4)})
        rows.append(row(f"C4 quality, {label}", texts, c))
        notes += agreement(f"C4, {label}", [r for r, _ in c["ours"][1]], [r for r, _ in c["theirs"][1]])
        kept = [(_lines(a[1]), _lines(b[1])) for a, b in zip(c["ours"][1], c["theirs"][1])
                if a[1] is not None and b[1] is not None]
        notes.append(f"  - kept by both: {sum(a == b for a, b in kept)} of {len(kept)} with the same lines (stripped, "
                     f"blank lines left out); lines only we keep {sum(len(set(a) - set(b)) for a, b in kept)}, "
                     f"only datatrove keeps {sum(len(set(b) - set(a)) for a, b in kept)}")
    m = best_of(args.rounds, {"ours": (lambda: dedup_texts, ours_minhash),
                              "theirs": (docs(dedup_texts), theirs_minhash)})
    rows.append(row("MinHash dedup, pages + edited copies", dedup_texts, m))
    s = best_of(args.rounds, {"ours": (lambda: dedup_texts, ours_minhash),
                              "theirs": (docs(dedup_texts), lambda d: theirs_minhash(d, signatures_only=True))})
    rows.append(row("MinHash: ours (all of it) vs datatrove signatures only", dedup_texts, s))
    ours_d, theirs_d = m["ours"][1], m["theirs"][1]
    n = len(pages)
    by_k_ours = Counter(copies[i - n][1] for i in ours_d if i >= n)
    by_k_theirs = Counter(copies[i - n][1] for i in theirs_d if i >= n)
    per_k = Counter(k for _, k in copies)
    notes.append(f"- MinHash: we drop {len(ours_d)}, datatrove drops {len(theirs_d)}, both {len(ours_d & theirs_d)}; "
                 f"originals dropped: ours {sum(i < n for i in ours_d)}, theirs {sum(i < n for i in theirs_d)}")
    notes.append("  - edited copies dropped, by words replaced: " + ", ".join(
        f"{k}: ours {by_k_ours[k]}/{per_k[k]}, theirs {by_k_theirs[k]}/{per_k[k]}" for k in sorted(per_k)))
    load1 = os.getloadavg()
    print("| stage (1 process, best of %d) | docs | MB | ours docs/s | datatrove docs/s | ours MB/s | datatrove MB/s "
          "| ours / datatrove |" % args.rounds)
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print()
    print("\n".join(notes))
    print(f"\nload average (1 min) at start {load0[0]:.1f}, at end {load1[0]:.1f}")


if __name__ == "__main__":
    main()
