import json
from collections import Counter

import pytest

from llamalab.commands.data.mix import Config, main
from llamalab.common import LlamalabError
from llamalab.data.mixture import (
    SourceWeight,
    llama_preset,
    mixture_stream,
    plan_mixture,
    rename_sources,
    resolve_weights,
    source_sizes,
)
from llamalab.data.readers import Document
from tests.data.conftest import jsonl_rows


def _nbytes(d: Document) -> int:
    return len(d.text.encode("utf-8"))


@pytest.fixture(scope="module")
def sources(botchan_paragraphs, wiki_texts):
    wiki = [p for t in wiki_texts for p in t.split("\n\n") if len(p.split()) >= 30]
    return {"books": [Document(f"b{i}", t, "books", f"botchan:{i}") for i, t in enumerate(botchan_paragraphs)],
            "wikipedia": [Document(f"w{i}", t, "wikipedia", f"wiki:{i}") for i, t in enumerate(wiki)]}


def test_llama_preset_table():
    p = llama_preset()
    assert sum(w.weight for w in p.values()) == pytest.approx(1.0)
    assert p["commoncrawl"].weight == 0.67 and p["c4"].weight == 0.15 and p["stackexchange"].weight == 0.02
    assert p["books"].weight == 0.045 and 2.0 < p["books"].epochs < 2.5


def test_proportions_epochs_and_determinism(sources):
    sizes = {n: sum(map(_nbytes, d)) for n, d in sources.items()}
    # books may be repeated twice; wikipedia once: the stream is capped by whichever runs out first
    weights = {"books": SourceWeight(0.7, 2.0), "wikipedia": SourceWeight(0.3, 1.0)}
    plan = plan_mixture(sizes, weights)
    stream = list(mixture_stream(sources, plan, seed=1))
    got = Counter()
    for d in stream:
        got[d.source] += _nbytes(d)
    total = sum(got.values())
    assert got["books"] / total == pytest.approx(0.7, abs=0.01)
    assert max(plan.sources[n]["passes"] for n in plan.sources) <= 2.0 + 1e-9
    binding = min(sizes, key=lambda n: sizes[n] * weights[n].epochs / weights[n].weight)
    assert binding == "books"  # Botchan is small next to 40 Wikipedia articles
    assert plan.sources["books"]["passes"] == pytest.approx(2.0)
    assert plan.sources["wikipedia"]["passes"] < 1.0
    # every prefix keeps the weights, not only the total
    prefix = stream[: len(stream) // 5]
    pb = sum(_nbytes(d) for d in prefix if d.source == "books") / sum(map(_nbytes, prefix))
    assert pb == pytest.approx(0.7, abs=0.03)
    # repeated documents keep their id, and come from a second epoch
    epochs = Counter(d.meta["epoch"] for d in stream if d.source == "books")
    assert epochs[0] > 0 and epochs[1] > 0
    ids = Counter(d.id for d in stream if d.source == "books")
    assert max(ids.values()) == 2
    again = list(mixture_stream(sources, plan, seed=1))
    assert [(d.id, d.meta["epoch"]) for d in again] == [(d.id, d.meta["epoch"]) for d in stream]
    other = list(mixture_stream(sources, plan, seed=2))
    assert [d.id for d in other] != [d.id for d in stream]


def test_plan_errors():
    with pytest.raises(LlamalabError, match="no data for source"):
        plan_mixture({"books": 10}, {"books": SourceWeight(0.5), "arxiv": SourceWeight(0.5)})
    plan = plan_mixture({"books": 10}, {"books": SourceWeight(0.5), "arxiv": SourceWeight(0.5)}, allow_missing=True)
    assert plan.missing == ["arxiv"] and plan.sources["books"]["weight"] == 1.0
    with pytest.raises(LlamalabError, match="have data but no weight"):
        plan_mixture({"books": 10, "web": 5}, {"books": SourceWeight(1.0)})


def _clean_out(tmp_path, sources):
    for name, docs in sources.items():
        d = tmp_path / "clean" / "docs" / name
        d.mkdir(parents=True)
        with open(d / "00000.jsonl", "w") as f:
            f.writelines(json.dumps({"id": doc.id, "text": doc.text, "source": name, "provenance": doc.provenance})
                         + "\n" for doc in docs)
    return tmp_path / "clean"


def test_mix_stage_jsonl_and_shards(tmp_path, sources, botchan_tokenizer, capsys):
    clean = _clean_out(tmp_path, sources)
    rec = main(Config(inputs=[str(clean)], preset="llama", allow_missing=True, output=str(tmp_path / "m1")))
    assert set(rec["sources"]) == {"books", "wikipedia"} and "commoncrawl" in rec["missing"]
    rows = jsonl_rows(tmp_path / "m1" / "mixed.jsonl")
    share = (sum(len(r["text"].encode()) for r in rows if r["source"] == "books")
             / sum(len(r["text"].encode()) for r in rows))
    assert share == pytest.approx(0.5, abs=0.02)  # books and wikipedia have equal LLaMA weights
    assert "mix:" in capsys.readouterr().out
    m = main(Config(inputs=[str(clean)], weights={"books": 0.25, "wikipedia": 0.75},
                    tokenizer=str(botchan_tokenizer.path), output=str(tmp_path / "m2"), val_fraction=0.0))
    manifest = json.loads((tmp_path / "m2" / "manifest.json").read_text())
    assert manifest["mixture"]["sources"]["books"]["weight"] == 0.25
    toks = manifest["tokens_by_source"]
    assert toks["books"] / (toks["books"] + toks["wikipedia"]) == pytest.approx(0.25, abs=0.05)
    assert m["actual_bytes"] == manifest["mixture"]["actual_bytes"]
    with pytest.raises(LlamalabError, match="not both"):
        main(Config(inputs=[str(clean)], preset="llama", weights={"books": 1}))


def test_weights_and_renames_for_the_mix_command():
    assert resolve_weights("llama", {}) == llama_preset()
    assert resolve_weights("", {"web": {"weight": 0.3, "epochs": 2}}) == {"web": SourceWeight(0.3, 2.0)}
    with pytest.raises(LlamalabError, match="give --preset llama or --weights"):
        resolve_weights("", {})
    by_source = {"web": [Document("web/1", "héllo", "web", "a.jsonl:1")]}
    renamed = rename_sources(by_source, {"web": "commoncrawl"})
    assert [(d.id, d.source) for d in renamed["commoncrawl"]] == [("web/1", "commoncrawl")] and "web" not in renamed
    assert source_sizes(renamed) == {"commoncrawl": 6}  # UTF-8 bytes, not characters
    with pytest.raises(LlamalabError, match="--rename: no source 'wiki' in the data"):
        rename_sources(renamed, {"wiki": "wikipedia"})


@pytest.fixture(scope="module")
def small_clean_corpus(tmp_path_factory, botchan_text, botchan_paragraphs, wiki_texts):
    """Like the issue's corpus: many small web pages, some articles, and one whole book."""
    d = tmp_path_factory.mktemp("small")
    return _clean_out(d, {
        "web": [Document(f"p{i}", t, "web", f"b:{i}") for i, t in enumerate(botchan_paragraphs)],
        "wikipedia": [Document(f"w{i}", t, "wikipedia", f"w:{i}") for i, t in enumerate(wiki_texts)],
        "books": [Document("botchan", botchan_text, "books", "botchan.txt:1")]})


def test_llama_preset_on_a_small_corpus_says_what_bounds_it_and_warns(small_clean_corpus, tmp_path, capsys):
    rec = main(Config(inputs=[str(small_clean_corpus)], preset="llama", rename={"web": "commoncrawl"},
                      allow_missing=True, output=str(tmp_path / "m")))
    out = capsys.readouterr().out
    sizes = {n: s["size_bytes"] for n, s in rec["sources"].items()}
    weights = {n: s["weight"] for n, s in rec["sources"].items()}
    epochs = {n: s["max_epochs"] for n, s in rec["sources"].items()}
    bound = min(sizes, key=lambda n: sizes[n] * epochs[n] / weights[n])  # the definition, recomputed
    assert rec["bound_by"] == bound == "commoncrawl"
    assert "mix: the stream is bounded by commoncrawl" in out
    # the one book is larger than twice its byte budget: it gets nothing, and the user hears of it
    assert rec["actual_bytes"].get("books", 0) == 0
    assert rec["sources"]["books"]["smallest_doc_bytes"] > 2 * rec["sources"]["books"]["planned_bytes"]
    [warning] = [w for w in rec["warnings"] if "books" in w]
    assert "books got 0.000 of the stream, planned 0.059" in warning and "--size-by largest" in warning
    assert warning in out
    assert json.loads((tmp_path / "m" / "mixture.json").read_text())["warnings"] == rec["warnings"]


def test_size_by_largest_repeats_small_sources_up_to_the_cap(small_clean_corpus, tmp_path, capsys):
    rec = main(Config(inputs=[str(small_clean_corpus)], preset="llama", rename={"web": "commoncrawl"},
                      allow_missing=True, size_by="largest", max_epochs=4, output=str(tmp_path / "m")))
    out = capsys.readouterr().out
    src = rec["sources"]
    room = {n: s["size_bytes"] / s["weight"] for n, s in src.items()}
    assert rec["bound_by"] == max(room, key=room.get) == "wikipedia"
    assert src["wikipedia"]["passes"] == pytest.approx(1.0)  # the largest source for its weight, read once
    target = src["wikipedia"]["size_bytes"] / src["wikipedia"]["weight"]
    for n in ("commoncrawl", "books"):  # both would need over 4 passes for their weight: capped
        assert src[n]["weight"] * target > 4 * src[n]["size_bytes"] and src[n]["passes"] == pytest.approx(4.0)
    assert sum(s["share"] for s in src.values()) == pytest.approx(1.0)
    rows = jsonl_rows(tmp_path / "m" / "mixed.jsonl")
    total = sum(len(r["text"].encode()) for r in rows)
    for n, s in src.items():  # what the plan promised is what the stream holds
        got = sum(len(r["text"].encode()) for r in rows if r["source"] == n)
        assert got / total == pytest.approx(s["share"], abs=0.02)
        assert max(r["epoch"] for r in rows if r["source"] == n) + 1 == round(s["passes"])
    assert rec["actual_bytes"]["books"] == 4 * src["books"]["size_bytes"]  # the book, 4 times
    # commoncrawl, capped at 4 passes of 0.25 MB, is far under its 0.88: said, with the way out
    assert rec["warnings"] == ["mix: warning: commoncrawl got 0.297 of the stream, planned 0.882: its 0.25 MB "
                               "may be read only 4 times; raise --max-epochs"]
    assert "mix: sized by the largest source for its weight, wikipedia" in out
    assert "planned  actual" in out  # the achieved-vs-planned table


def test_plan_size_by_checks():
    with pytest.raises(LlamalabError, match="size_by must be one of"):
        plan_mixture({"a": 1}, {"a": SourceWeight(1.0)}, size_by="median")
    with pytest.raises(LlamalabError, match="max_epochs"):
        plan_mixture({"a": 1}, {"a": SourceWeight(1.0)}, max_epochs=-1)
    # max_epochs replaces each source's own cap in the default mode too
    plan = plan_mixture({"a": 100, "b": 1000}, {"a": SourceWeight(0.5, 1.0), "b": SourceWeight(0.5, 1.0)},
                        max_epochs=3)
    assert plan.bound_by == "a" and plan.total_bytes == pytest.approx(600) and plan.sources["a"]["passes"] == 3.0
