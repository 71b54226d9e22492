from llamalab.data.clean.stackexchange import (
    clean_thread,
    html_to_text,
    read_posts,
    read_threads,
)
from tests.conftest import shared_path


def test_html_to_text():
    html = "<p>Use <code>x</code> like:</p><pre><code>a = 1\nb = 2\n</code></pre><ul><li>one</li><li>two</li></ul>"
    assert html_to_text(html).splitlines() == ["Use x like:", "", "a = 1", "b = 2", "", "one", "", "two"]


def test_real_dump_question_then_answers_by_score():
    path = shared_path("corpus/stackexchange/Posts.xml")
    posts = read_posts(path)
    docs = list(read_threads(path))
    assert len(docs) == sum(p["PostTypeId"] == 1 for p in posts.values())
    results = [clean_thread(d.meta["question"], d.meta["answers"]) for d in docs]
    no_answers = [d for d, r in zip(docs, results) if not r.kept]
    assert no_answers and all(not d.meta["answers"] for d in no_answers)
    multi = next(d for d in docs if len({a["Score"] for a in d.meta["answers"]}) > 1)
    text = clean_thread(multi.meta["question"], multi.meta["answers"]).text
    assert text.startswith(multi.meta["question"]["Title"])
    ranked = sorted(multi.meta["answers"], key=lambda a: -a["Score"])
    first_words = [html_to_text(a["Body"])[:60] for a in ranked]
    positions = [text.index(w) for w in first_words]
    assert positions == sorted(positions)
    assert "<p>" not in text and "&lt;" not in text
