"""The data hot paths of an earlier commit beside the working tree's, in one process, alternating
rounds, with a check that both give the same output (speed-ups must not change results).

    nice -n 5 python bench/data_before_after.py [--ref d8f7a7d] [--pages 1500] [--rounds 2]

``--ref`` (a git commit of this repository; default: the last one before the data fast paths)
supplies ``llamalab/data/filters.py``, ``dedup.py``, ``clean/web.py`` and ``clean/wiki.py`` as
separate modules (``git show``); the rest of the package is the working tree's. Inputs are
``bench/data_pipeline.py``'s: 1,500 web pages cut from Shakespeare, the shared Wikipedia dump. Per
stage: the best of ``--rounds``, documents/s and MB/s before and after, the ratio, and whether
the outputs are equal. One-time setup (model loading, table building) is done before timing.
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def old_module(ref: str, rel: str, name: str, **patch) -> types.ModuleType:
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{ref}:{rel}"], capture_output=True, text=True,
                         check=True).stdout
    m = types.ModuleType(name)
    sys.modules[name] = m  # dataclasses look their module up
    exec(compile(src, f"{ref}:{rel}", "exec"), m.__dict__)
    for k, v in patch.items():
        setattr(m, k, v)
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ref", default="d8f7a7d")
    ap.add_argument("--shared", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--pages", type=int, default=1500)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    from data_pipeline import web_pages

    from llamalab.data import dedup as ND
    from llamalab.data import filters as NF
    from llamalab.data.clean import web as NW
    from llamalab.data.clean import wiki as NWK

    OF = old_module(args.ref, "llamalab/data/filters.py", "before_filters")
    OD = old_module(args.ref, "llamalab/data/dedup.py", "before_dedup")
    OW = old_module(args.ref, "llamalab/data/clean/web.py", "before_web", filters=OF)
    OWK = old_module(args.ref, "llamalab/data/clean/wiki.py", "before_wiki")
    shared = Path(args.shared)
    pages = web_pages(shared, args.pages)
    wiki_raw = [d.text for d in NWK.read_dump(shared / "corpus/enwiki_markup.xml.bz2")]
    wiki = [r.text for r in map(NWK.clean_wiki, wiki_raw) if r.kept]
    times = {}
    for side, F in (("before", OF), ("after", NF)):
        t0 = time.perf_counter()
        lm = F.NgramLM().fit(wiki)
        times[f"fit {side}"] = time.perf_counter() - t0
        lm.perplexity("warm up")
        F.detect_language("warm up")
        times[side] = (lm, F.ReferenceClassifier().fit(wiki, pages[:200]))
    (olm, oclf), (nlm, nclf) = times["before"], times["after"]
    pmb = sum(len(t.encode()) for t in pages) / 1e6
    wmb = sum(len(t.encode()) for t in wiki_raw) / 1e6

    def near(mod):
        idx = mod.NearDupIndex()
        return [idx.check_and_add(str(k), p) for k, p in enumerate(pages)]

    def web(mod, lm, clf):
        return [(r.kept, r.reason, r.text, r.meta) for r in
                (mod.clean_web(p, mod.WebConfig(drop_buckets=[]), lm=lm, cutoffs=(1e9, 1e9), classifier=clf)
                 for p in pages)]

    stages = [
        ("web: language id", pages, pmb, lambda: [OF.detect_language(p) for p in pages],
         lambda: [NF.detect_language(p) for p in pages]),
        ("web: Gopher rules", pages, pmb, lambda: [OF.gopher_filter(p) for p in pages],
         lambda: [NF.gopher_filter(p) for p in pages]),
        ("web: C4 line rules", pages, pmb, lambda: [OF.c4_lines(p) for p in pages],
         lambda: [NF.c4_lines(p) for p in pages]),
        ("web: perplexity", pages, pmb, lambda: [olm.perplexity(p) for p in pages],
         lambda: [nlm.perplexity(p) for p in pages]),
        ("web: reference classifier", pages, pmb, lambda: [oclf.score(p) for p in pages],
         lambda: [nclf.score(p) for p in pages]),
        ("web: clean_web (all of the above)", pages, pmb, lambda: web(OW, olm, oclf), lambda: web(NW, nlm, nclf)),
        ("dedup: MinHash LSH", pages, pmb, lambda: near(OD), lambda: near(ND)),
        ("wiki: wikitext -> text", wiki_raw, wmb, lambda: [OWK.clean_wiki(t).text for t in wiki_raw],
         lambda: [NWK.clean_wiki(t).text for t in wiki_raw]),
    ]
    print(f"load average at start {os.getloadavg()[0]:.1f}; perplexity LM fit on the wiki text: "
          f"before {times['fit before']:.2f} s, after {times['fit after']:.2f} s (same counts)")
    print(f"| stage (1 process, best of {args.rounds}) | docs | MB | before docs/s | after docs/s | before MB/s "
          "| after MB/s | after / before | same output |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, items, mb, before, after in stages:
        best = {"before": float("inf"), "after": float("inf")}
        out = {}
        for r in range(args.rounds):
            order = (("before", before), ("after", after))
            for side, fn in (order if r % 2 == 0 else order[::-1]):
                t0 = time.perf_counter()
                out[side] = fn()
                best[side] = min(best[side], time.perf_counter() - t0)
        n, b, a = len(items), best["before"], best["after"]
        print(f"| {name} | {n} | {mb:.2f} | {n / b:,.0f} | {n / a:,.0f} | {mb / b:.2f} | {mb / a:.2f} | "
              f"**{b / a:.1f}x** | {out['before'] == out['after']} |", flush=True)
    print(f"load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
