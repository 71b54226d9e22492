import re

from llamalab.data.clean.wiki import clean_wiki, read_dump, wikitext_to_text
from tests.conftest import shared_path


def test_markup_removed_hand_made():
    markup = ("{{Infobox person|name=X}}'''Ada''' was a [[mathematician|math person]]<ref>Cite A</ref> "
              "<!-- hidden -->who wrote [[notes]].\n{| class=wikitable\n|-\n| cell1 || cell2\n|}\n"
              "== Life ==\n[[File:Ada.jpg|thumb|A caption]]She lived in [http://x.org London].\n"
              "[[Category:People]]")
    text = wikitext_to_text(markup)
    assert text.splitlines()[0] == "Ada was a math person who wrote notes."
    assert "Life" in text.splitlines() and "She lived in London." in text
    for junk in ("Infobox", "Cite A", "hidden", "cell1", "caption", "Category", "http", "'''", "[[", "{{"):
        assert junk not in text


def test_real_dump_pages(wiki_texts):
    docs = list(read_dump(shared_path("corpus/enwiki_markup.xml.bz2")))
    assert len(docs) == 205  # 206 pages, one outside namespace 0 is left out by the reader
    redirects = [d for d in docs if d.meta["redirect"]]
    assert redirects and all(clean_wiki(d.text).reason == "wiki:redirect" for d in redirects[:10])
    anarchism = wiki_texts[0]
    assert anarchism.startswith("Anarchism is a political philosophy")
    for text in wiki_texts:
        assert not re.search(r"\{\{|\}\}|\[\[|\]\]|<ref|\{\||'''", text), text[:200]
    assert sum(len(t.split()) for t in wiki_texts) > 100_000
