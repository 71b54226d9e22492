from llamalab.data import filters
from llamalab.data.clean.web import WebConfig, clean_web
from llamalab.data.dedup import dedup_lines, first_seen, shard_line_hashes


def _page(body: str) -> str:
    return ("Home | Products | Contact\nWe use cookies to improve your experience on this site.\n"
            + body + "\nPlease enable JavaScript to continue.")


def test_real_prose_kept_boilerplate_lines_counted(botchan_paragraphs):
    body = next(p for p in botchan_paragraphs[3:] if p.endswith("."))
    res = clean_web(_page(body))
    assert res.kept and res.text == body
    assert set(res.dropped_lines) == {"c4:no_terminal_punct", "c4:cookie", "c4:javascript"}


def test_each_stage_drops_for_its_reason(botchan_paragraphs):
    fr = ("Le chat dort sur le canapé depuis ce matin. Il ne veut pas sortir sous la pluie. "
          "Sa maîtresse lui prépare un bol de lait chaud. Puis elle lit un livre près de la fenêtre.")
    assert clean_web(fr).reason == "lang:fr"
    body = next(p for p in botchan_paragraphs[3:] if p.endswith("."))
    assert clean_web("Lorem ipsum dolor sit amet. " + body).reason == "c4:lorem_ipsum"
    assert clean_web("Only a few words here. And here. Done.").reason == "gopher:too_few_words"
    assert clean_web("Menu\nLogin\nSearch").reason == "c4:no_lines_left"


def test_cross_shard_line_dedup():
    shard0 = ["The weather was fine today and we went out.\nA unique line from the first page is here."]
    shard1 = ["THE WEATHER was fine today, and we went out!\nAnother line that only page two has got."]
    first = first_seen([shard_line_hashes(shard0), shard_line_hashes(shard1)])
    seen: set[int] = set()
    text, dropped = dedup_lines(shard1[0], 1, first, seen)
    assert dropped == ["THE WEATHER was fine today, and we went out!"]
    assert text == "Another line that only page two has got."
    text0, dropped0 = dedup_lines(shard0[0], 0, first, set())
    assert dropped0 == [] and text0 == shard0[0]


def test_perplexity_and_classifier_stages(wiki_texts, botchan_paragraphs):
    lm = filters.NgramLM().fit(wiki_texts[:20])
    page = next(p for p in botchan_paragraphs[10:] if p.endswith("."))
    ppl = lm.perplexity(page)
    cfg = WebConfig(gopher=False)
    assert clean_web(page, cfg, lm=lm, cutoffs=(ppl / 2, ppl / 1.5)).reason == "perplexity:tail"
    res = clean_web(page, cfg, lm=lm, cutoffs=(ppl * 2, ppl * 3))
    assert res.kept and res.meta["bucket"] == "head"
    clf = filters.ReferenceClassifier(n_bits=16).fit(wiki_texts[:20], botchan_paragraphs[:40])
    res = clean_web(page, cfg, classifier=clf)
    assert res.reason == "classifier:not_reference_like" and res.meta["reference_score"] < 0.5
