import random

from llamalab.data.clean.books import BookDeduper, clean_book, strip_gutenberg


def test_gutenberg_markers_stripped(botchan_text):
    res = clean_book(botchan_text)
    assert res.kept
    assert "PROJECT GUTENBERG" not in res.text.upper().replace("PROJECT GUTENBERG'S", "")[:2000]
    assert "END OF THIS PROJECT GUTENBERG" not in res.text
    assert len(res.text.split()) > 40_000
    assert any("START OF THIS PROJECT GUTENBERG" in ln for ln in res.dropped_lines["books:gutenberg_boilerplate"])
    assert strip_gutenberg("no markers here") == ("no markers here", [])
    assert clean_book("a short note").reason == "books:too_short"


def test_book_near_duplicate(botchan_paragraphs):
    book = " ".join(botchan_paragraphs[:60])
    other = " ".join(botchan_paragraphs[60:120])
    words = book.split()
    rng = random.Random(0)
    edited = list(words)
    for i in rng.sample(range(len(words)), 5):  # a few words changed: a re-edition
        edited[i] = "changed"
    dd = BookDeduper(threshold=0.9)
    assert dd.check_and_add("a", book) is None
    assert dd.check_and_add("b", other) is None
    hit = dd.check_and_add("c", " ".join(edited))
    assert hit is not None and hit[0] == "a" and hit[1] > 0.9
    # half the book is not a >90% duplicate
    assert dd.check_and_add("d", " ".join(words[: len(words) // 2])) is None
