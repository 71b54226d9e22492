import math
import random

import pytest

from llamalab.data import filters


def test_language_id_on_real_text(botchan_paragraphs):
    assert filters.language_filter(botchan_paragraphs[5]) is None
    assert filters.detect_language(botchan_paragraphs[5])[0] == "en"
    fr = "Le petit chat est monté sur le toit de la maison, et il refuse maintenant de redescendre."
    assert filters.language_filter(fr) == "lang:fr"
    assert filters.language_filter(fr, languages=["en", "fr"]) is None
    assert filters.language_filter("hi") == "lang:too_short"


def test_gopher_keeps_real_prose(botchan_paragraphs):
    kept = sum(filters.gopher_filter(p) is None for p in botchan_paragraphs)
    assert kept / len(botchan_paragraphs) > 0.9


@pytest.mark.parametrize("text,reason", [
    ("the cat and the dog " * 5, "gopher:too_few_words"),
    ("extraordinarily " * 60 + "the and of to " * 3, "gopher:mean_word_length"),
    ("the garden #tag and sunlight to water " * 10, "gopher:symbol_ratio"),
    ("\n".join(["- the item and the thing to buy"] * 20), "gopher:bullet_lines"),
    ("\n".join(["the story of the old man and his loyal dog..."] * 20), "gopher:ellipsis_lines"),
    ("1234 5678 9012 3456 the garden and of " * 10, "gopher:non_alpha_words"),
    ("cats like fish very much indeed " * 20, "gopher:stop_words"),
])
def test_gopher_rules_each_fire(text, reason):
    assert filters.gopher_filter(text) == reason


def test_c4_line_rules():
    page = ("Welcome to my page about gardens.\n"
            "Please enable JavaScript to view this site.\n"
            "We use cookies to improve your experience.\n"
            "Home | About | Contact\n"
            "Tomatoes need full sun and regular watering in summer.\n"
            "Ok.\n")
    text, dropped = filters.c4_lines(page)
    assert text.splitlines() == ["Welcome to my page about gardens.",
                                 "Tomatoes need full sun and regular watering in summer."]
    assert dropped == {"c4:javascript": ["Please enable JavaScript to view this site."],
                       "c4:cookie": ["We use cookies to improve your experience."],
                       "c4:no_terminal_punct": ["Home | About | Contact"],
                       "c4:short_line": ["Ok."]}


def test_c4_doc_rules():
    prose = "The garden is green. The sun is out. We planted beans. It rained."
    assert filters.c4_doc_filter(prose) is None
    assert filters.c4_doc_filter("Lorem ipsum dolor sit amet. " + prose) == "c4:lorem_ipsum"
    assert filters.c4_doc_filter(prose + " function f() { return 1; }") == "c4:curly_brace"
    assert filters.c4_doc_filter("One sentence only.") == "c4:too_few_sentences"


def test_ngram_lm_prefers_real_text(wiki_texts, botchan_paragraphs):
    lm = filters.NgramLM().fit(wiki_texts[:30])
    held_out = wiki_texts[35]
    shuffled_words = held_out.split()
    random.Random(0).shuffle(shuffled_words)
    assert lm.perplexity(held_out) < 0.5 * lm.perplexity(" ".join(shuffled_words))
    # a probability distribution: p(w|u,v) over the vocabulary plus <unk> sums to 1
    u, v = "<s>", "the"
    total = sum(lm.prob(u, v, w) for w in lm.c1) + lm.prob(u, v, "zzz-unseen-word")
    assert math.isclose(total, 1.0, rel_tol=1e-9)


def test_perplexity_buckets_split_by_quantile(wiki_texts, botchan_paragraphs, tmp_path):
    lm = filters.NgramLM().fit(wiki_texts[:30])
    ppl = [lm.perplexity(p) for p in botchan_paragraphs]
    cut = filters.bucket_cutoffs(ppl)
    buckets = [filters.perplexity_bucket(p, cut) for p in ppl]
    for b in ("head", "middle", "tail"):
        assert abs(buckets.count(b) / len(buckets) - 1 / 3) < 0.05
    lm.save(tmp_path / "lm.pkl")
    assert filters.NgramLM.load(tmp_path / "lm.pkl").perplexity(botchan_paragraphs[0]) == pytest.approx(ppl[0])


def test_reference_classifier_separates_wiki_from_fiction(wiki_texts, botchan_paragraphs, tmp_path):
    wiki_paras = [p for t in wiki_texts for p in t.split("\n\n") if len(p.split()) >= 40]
    pos_train, pos_test = wiki_paras[::2], wiki_paras[1::2]
    neg_train, neg_test = botchan_paragraphs[::2], botchan_paragraphs[1::2]
    clf = filters.ReferenceClassifier(n_bits=16).fit(pos_train, neg_train)
    correct = sum(clf.score(p) >= 0.5 for p in pos_test) + sum(clf.score(p) < 0.5 for p in neg_test)
    assert correct / (len(pos_test) + len(neg_test)) > 0.9
    clf.save(tmp_path / "clf.npz")
    loaded = filters.ReferenceClassifier.load(tmp_path / "clf.npz")
    assert loaded.score(pos_test[0]) == pytest.approx(clf.score(pos_test[0]))


def test_models_fit_from_a_real_wiki_dump_reference(tmp_path, botchan_paragraphs):
    """The reference corpus may be a MediaWiki dump: its first 80 pages (16 articles,
    the rest redirects), cut from the shared one."""
    import bz2

    from llamalab.data.clean.pipeline import (
        CleanSettings,
        SourceSpec,
        fit_models,
        plan_shards,
    )
    from tests.conftest import shared_path

    with bz2.open(shared_path("corpus/enwiki_markup.xml.bz2"), "rt", encoding="utf-8") as f:
        xml = f.read()
    cut = xml.find("</page>", xml.find("<page>"))
    for _ in range(79):
        cut = xml.find("</page>", cut + 1)
    (tmp_path / "ref.xml").write_text(xml[: cut + len("</page>")] + "\n</mediawiki>\n", encoding="utf-8")
    (tmp_path / "web").mkdir()
    pages = [p for p in botchan_paragraphs if p.endswith(".")][:30]  # C4 keeps only lines ending a sentence
    (tmp_path / "web" / "pages.txt").write_text("\n\n".join(pages), encoding="utf-8")
    sources = [SourceSpec("web", "web", [str(tmp_path / "web")], text_mode="paragraphs")]
    s = CleanSettings(reference=[str(tmp_path / "ref.xml")], calib_docs=30)
    info = fit_models(sources, plan_shards(sources, s), s, tmp_path / "out")
    assert info["reference_docs"] == 16 and info["calibration_docs"] == 30
    lo, hi = info["cutoffs"]
    assert 1 < lo < hi
    clf = filters.ReferenceClassifier.load(info["classifier"])
    assert clf.score(botchan_paragraphs[40]) < 0.5  # fiction is not reference-like
