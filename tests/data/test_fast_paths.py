"""The fast paths of the data filters against their definitions: each is checked to give the same
result, bit for bit, as the slow code it replaced (or the library it stands in for) on real text
from the shared data plus edge cases. Speed is measured in bench/, not here."""

from __future__ import annotations

import gzip
import json
import math
import random
import re

import numpy as np
import pytest

from llamalab.data import filters
from tests.conftest import shared_path

EDGE = ["", " ", "x", "...", "İstanbul ŞEHİR ΣΊΣΥΦΟΣ and the", "THE END OF THE STORY AND THE WORLD",
        "\u00a0the\u2003and of the\x1cwith\x1fthat", "’tis the season, and of the year.\r\nyes it is the end.",
        "• a\n• b\n\n\n• c", "naïve café the and to of " * 20, "1234 5678 the, and; 'of' \"to\" (with) " * 8,
        "COOKIES we use. javascript here.\nPrivacy Policy applies to all.\nok fine good line here.",
        "x" * 3000, "a\u0301b \u2028c\u2029 d\x0be\x0cf\x85g"]


@pytest.fixture(scope="module")
def texts(wiki_texts, botchan_paragraphs) -> list[str]:
    """Real English prose, other languages and scripts (ShareGPT turns), code, and edge cases."""
    out = list(EDGE) + botchan_paragraphs[:60] + wiki_texts[:15]
    with gzip.open(shared_path("sft/sharegpt_sample.jsonl.gz"), "rt", encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i >= 150:
                break
            out += [t["value"] for t in json.loads(line)["conversations"][:2]]
    with gzip.open(shared_path("eval/HumanEval.jsonl.gz"), "rt", encoding="utf-8") as f:
        out += [json.loads(line)["prompt"] for line in f][:20]
    assert any(not t.isascii() for t in out)
    return out


# ----------------------------------------------------------------------------- language id


def test_language_id_is_py3langids(texts):
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    fast = filters._identifier()
    assert type(fast).__name__ == "FastIdentifier"  # the fast path is on (no silent fallback)
    plain = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    langs = set()
    for t in texts:
        got = fast.classify(t[:4000])
        assert got == plain.classify(t[:4000]), t[:80]
        langs.add(got[0])
    assert len(langs) >= 5  # not only English: several languages' features are exercised


def _walk(nextmove, rowbase, data: bytes, start: int = 0) -> list[int]:
    state, out = start, []
    for b in data:
        state = int(nextmove[rowbase[state] + b])
        out.append(state)
    return out


def test_dfa_window_on_small_automata():
    # state = "the last byte was 'a'": depends on 1 byte
    nm = np.zeros(2 * 256, np.int64)
    nm[ord("a")] = nm[256 + ord("a")] = 1
    assert filters.dfa_window(nm, np.array([0, 256])) == 1
    # parity of the number of 'a's: depends on the whole text, no window
    par = np.zeros(2 * 256, np.int64)
    par[:256], par[256:] = 0, 1
    par[ord("a")], par[256 + ord("a")] = 1, 0
    assert filters.dfa_window(par, np.array([0, 256])) is None


def test_dfa_window_of_the_langid_model_holds_on_real_bytes(texts):
    """Walking the last W bytes from state 0 lands where the whole walk does (the proof's claim)."""
    fast = filters._identifier()
    nm, rb, _ = fast._nm_rb
    w = fast._window
    data = "".join(texts[:40]).encode("utf-8")[:20000]
    full = _walk(nm, rb, data)
    rng = random.Random(0)
    for i in rng.sample(range(len(data)), 300):
        assert _walk(nm, rb, data[max(0, i - w + 1):i + 1])[-1] == full[i]


# ----------------------------------------------------------------------------- perplexity LM


def _reference_log_prob(lm: filters.NgramLM, text: str) -> tuple[float, int]:
    lp, n = 0.0, 0
    for u, v, w in lm._trigrams(text):
        lp += math.log(lm.prob(u, v, w))
        n += 1
    return lp, n


def test_lm_tables_give_the_dict_models_numbers(wiki_texts, texts, tmp_path):
    lm = filters.NgramLM().fit(wiki_texts[:10])
    for t in texts:
        assert lm.log_prob(t) == _reference_log_prob(lm, t), t[:80]
    lm.save(tmp_path / "lm.pkl")  # the tables are not saved; a loaded model builds its own
    lm2 = filters.NgramLM.load(tmp_path / "lm.pkl")
    assert "_table" not in lm2.__dict__
    assert [lm2.log_prob(t) for t in texts[:30]] == [lm.log_prob(t) for t in texts[:30]]
    lm.fit(wiki_texts[10:15])  # more counts: the tables are rebuilt
    for t in texts[:30]:
        assert lm.log_prob(t) == _reference_log_prob(lm, t)


def test_lm_fit_counts_as_the_per_trigram_loop_did(wiki_texts, botchan_paragraphs):
    """Same counts, same key order (so the same lm.pkl bytes), also when fit is called twice."""
    import pickle
    from collections import Counter

    ref = filters.NgramLM()
    for name in ("c1", "c2", "c3", "ctx1", "ctx2", "n1_1", "n1_2"):
        setattr(ref, name, Counter())
    for text in wiki_texts[:8] + botchan_paragraphs[:20] + EDGE:
        for u, v, w in ref._trigrams(text):
            ref.c1[w] += 1
            ref.total += 1
            if ref.c2[(v, w)] == 0:
                ref.n1_1[v] += 1
            ref.c2[(v, w)] += 1
            ref.ctx1[v] += 1
            if ref.c3[(u, v, w)] == 0:
                ref.n1_2[(u, v)] += 1
            ref.c3[(u, v, w)] += 1
            ref.ctx2[(u, v)] += 1
    lm = filters.NgramLM().fit(wiki_texts[:8]).fit(botchan_paragraphs[:20] + EDGE)
    for name in ("c1", "c2", "c3", "ctx1", "ctx2", "n1_1", "n1_2"):
        assert list(getattr(lm, name).items()) == list(getattr(ref, name).items()), name
    assert lm.total == ref.total
    assert pickle.dumps(lm.__dict__) == pickle.dumps(ref.__dict__)
    with pytest.raises(Exception, match="no tokens"):
        filters.NgramLM().fit(["", "  \n "])


def test_int_table_is_a_dict():
    rng = np.random.default_rng(0)
    keys = np.unique(rng.integers(0, 1 << 62, 5000))
    vals = rng.integers(1, 1 << 40, len(keys))
    table = filters._IntTable(keys, vals)
    q = np.concatenate([keys[::3], rng.integers(0, 1 << 62, 2000), [0, (1 << 62) - 1]])
    ref = dict(zip(keys.tolist(), vals.tolist()))
    assert table.get(q).tolist() == [ref.get(k, 0) for k in q.tolist()]
    assert filters._IntTable(np.array([7]), np.array([3])).get(np.array([7, 8])).tolist() == [3, 0]


# ----------------------------------------------------------------------------- Gopher, C4


def test_ascii_whitespace_of_re_is_that_of_split():
    for c in map(chr, range(128)):
        assert (len(("a" + c + "b").split()) == 2) == bool(re.fullmatch(r"\s", c)), repr(c)


def test_gopher_counts_match_their_definitions(texts):
    extra = ["".join(random.Random(s).choice(" \t\n\x1c\x1fab1.,'\"!-#") for _ in range(400)) for s in range(50)]
    for t in texts + extra:
        ws = t.split()
        alpha = sum(any(c.isalpha() for c in w) for w in ws)
        stop = len(filters.STOP_WORDS.intersection(w.lower().strip(".,;:!?\"'") for w in ws))
        assert filters._alpha_words(t, ws) == alpha, t[:80]
        assert filters._stop_words(t, ws, 99) == stop, t[:80]
        assert filters._stop_words(t, ws, 2) == min(stop, 2)


def test_c4_lines_skip_pattern_search_only_when_it_cannot_match(texts):
    def reference(text):
        kept, dropped = [], {}
        for line in text.splitlines():
            reason = filters.c4_line_reason(line) if line.strip() else None
            (kept.append(line) if reason is None else dropped.setdefault(reason, []).append(line))
        return "\n".join(kept).strip("\n"), dropped

    cases = texts + ["We use COOKIES here, you accept.\nAll Rights Reserved to us all.\nJavaScript is needed now.",
                     "Terms of Use apply to you.\nfine line with words.", "Terms  of use: two spaces, kept."]
    for t in cases:
        assert filters.c4_lines(t) == reference(t), t[:80]



# ----------------------------------------------------------------------------- MinHash, wikitext


def test_minhash_is_datasketchs(texts):
    from datasketch import MinHash

    from llamalab.data.dedup import minhash, shingles

    for t in texts[:80]:
        ref = MinHash(num_perm=128, seed=1)  # a fresh one draws its own permutations
        ref.update_batch(list(shingles(t, 5)))
        assert minhash(t).hashvalues.tolist() == ref.hashvalues.tolist()
    assert minhash(texts[20], num_perm=64, seed=7).hashvalues.tolist() != minhash(texts[20]).hashvalues[:64].tolist()


def test_wikitext_token_renderer_is_the_tree_renderer():
    """The token walk renders pages of the shared dump as the parsed tree does (the first 25 here;
    all 205 were compared when it was written, and bench/data_before_after.py compares them all)."""
    import mwparserfromhell

    from llamalab.data.clean.wiki import _parse_render, _render, read_dump

    pages = [d.text for d in read_dump(shared_path("corpus/enwiki_markup.xml.bz2")) if not d.meta["redirect"]][:25]
    hand = ["{{a|b=[[c]]}}x<ref name=q>y</ref>[[File:z.png|thumb|cap [[w]]]]&amp;&#65;&#x42;<br/>p<p>q</p>",
            "== H {{t}} ==\n[[{{t}}File:x|shown]] [[Image :y]] [http://a.b title ''it''] [http://c.d]",
            "<div class=\"a\" style='b'>in<span>ner</span></div><!-- c -->{{{arg|d}}}'''b''' ''i''\n"
            "* li\n# ol\n; dt : dd",
            "{| class=x\n|-\n! h\n| c\n|}\n<math>x^2</math><gallery>a</gallery><nowiki>[[n]]</nowiki>"]
    for markup in pages + hand:
        assert _parse_render(markup) == _render(mwparserfromhell.parse(markup))
