"""Web pages (CommonCrawl, CCNet-style): line dedup, C4 line rules, language id, C4/Gopher page
rules, perplexity bucket, reference classifier, in that order (cheap and line-level first, so
the expensive scores run on fewer, cleaner pages).

``clean_web`` is pure: cross-shard line dedup enters as ``line_dedup`` (a function
``text -> (kept text, dropped lines)``, see :func:`llamalab.data.dedup.dedup_lines`), and the
trained models as ``lm``/``cutoffs``/``classifier``; any of them may be None to skip that step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from llamalab.data import filters
from llamalab.data.clean import CleanResult, drop


@dataclass
class WebConfig:
    languages: list[str] = field(default_factory=lambda: ["en"])
    min_lang_prob: float = 0.5
    c4_lines: bool = True
    c4_doc: bool = True
    gopher: bool = True
    heuristics: filters.HeuristicConfig = field(default_factory=filters.HeuristicConfig)
    drop_buckets: list[str] = field(default_factory=lambda: ["tail"])
    min_reference_score: float = 0.5


def clean_web(text: str, cfg: WebConfig | None = None,
              line_dedup: Callable[[str], tuple[str, list[str]]] | None = None,
              lm: filters.NgramLM | None = None, cutoffs: tuple[float, float] | None = None,
              classifier: filters.ReferenceClassifier | None = None) -> CleanResult:
    cfg = cfg or WebConfig()
    res = CleanResult(text)
    if line_dedup is not None:
        text, dup = line_dedup(text)
        res.add_lines("line_dedup", dup)
        if not text.strip():
            return drop("line_dedup:empty", res)
    if cfg.c4_lines:
        text, dropped = filters.c4_lines(text, cfg.heuristics)
        for reason, lines in dropped.items():
            res.add_lines(reason, lines)
        if not text.strip():
            return drop("c4:no_lines_left", res)
    reason = filters.language_filter(text, cfg.languages, cfg.min_lang_prob)
    if reason:
        return drop(reason, res)
    for check, on in ((filters.c4_doc_filter, cfg.c4_doc), (filters.gopher_filter, cfg.gopher)):
        reason = check(text, cfg.heuristics) if on else None
        if reason:
            return drop(reason, res)
    if lm is not None:
        ppl = lm.perplexity(text)
        res.meta["perplexity"] = round(ppl, 2)
        if cutoffs is not None:
            bucket = filters.perplexity_bucket(ppl, cutoffs)
            res.meta["bucket"] = bucket
            if bucket in cfg.drop_buckets:
                return drop(f"perplexity:{bucket}", res)
    if classifier is not None:
        score = classifier.score(text)
        res.meta["reference_score"] = round(score, 4)
        if score < cfg.min_reference_score:
            return drop("classifier:not_reference_like", res)
    res.text = text
    return res
