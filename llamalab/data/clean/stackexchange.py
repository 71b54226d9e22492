"""Stack Exchange dumps (``Posts.xml``): one document per question: title, question body, then its
answers sorted by score (highest first, ties by answer id), HTML converted to text.

HTML goes through BeautifulSoup (``html.parser``: no lxml needed); code blocks keep their line
breaks, paragraphs and list items become lines. Questions with no answers are dropped with a
reason (``min_answers``), as are posts whose body is empty.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

from llamalab.common import LlamalabError
from llamalab.data.clean import CleanResult, drop
from llamalab.data.readers import Document, open_binary

_BLOCK = ("p", "pre", "li", "blockquote", "h1", "h2", "h3", "h4", "h5", "h6", "div", "tr", "br", "hr")


def html_to_text(html: str) -> str:
    from bs4 import BeautifulSoup  # optional extra: llamalab[data]

    soup = BeautifulSoup(html, "html.parser")
    for tag in soup.find_all(_BLOCK):
        tag.insert_before("\n")
        tag.insert_after("\n")
    text = soup.get_text()
    text = re.sub(r"[ \t]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def read_posts(path: str | Path) -> dict[int, dict]:
    """Every row of a Posts.xml: id -> attributes (ints for Id/PostTypeId/ParentId/Score)."""
    path = Path(path)
    posts: dict[int, dict] = {}
    with open_binary(path) as f:
        try:
            for _, el in ET.iterparse(f, events=("end",)):
                if el.tag != "row":
                    continue
                a = dict(el.attrib)
                el.clear()
                try:
                    pid = int(a["Id"])
                    a["PostTypeId"] = int(a.get("PostTypeId", 0))
                    a["Score"] = int(a.get("Score", 0))
                    a["ParentId"] = int(a["ParentId"]) if "ParentId" in a else None
                except (KeyError, ValueError) as e:
                    raise LlamalabError(f"{path}: row {a.get('Id', '?')}: bad or missing attribute ({e})") from None
                posts[pid] = a
        except ET.ParseError as e:
            raise LlamalabError(f"{path}: not a readable Stack Exchange Posts.xml ({e})") from None
    return posts


def thread_text(question: dict, answers: list[dict]) -> str:
    parts = []
    if question.get("Title"):
        parts.append(question["Title"].strip())
    parts.append(html_to_text(question.get("Body", "")))
    for a in sorted(answers, key=lambda a: (-a["Score"], int(a["Id"]))):
        parts.append(html_to_text(a.get("Body", "")))
    return "\n\n".join(p for p in parts if p)


def clean_thread(question: dict, answers: list[dict], min_answers: int = 1) -> CleanResult:
    if len(answers) < min_answers:
        return drop("stackexchange:no_answers")
    if not html_to_text(question.get("Body", "")).strip():
        return drop("stackexchange:empty_question")
    res = CleanResult(thread_text(question, answers))
    res.meta["n_answers"] = len(answers)
    return res


def read_threads(path: str | Path, source: str = "stackexchange") -> Iterator[Document]:
    """One Document per question; ``meta['answers']`` carries the raw answer rows for the cleaner."""
    posts = read_posts(path)
    answers: dict[int, list[dict]] = {}
    for p in posts.values():
        if p["PostTypeId"] == 2 and p["ParentId"] is not None:
            answers.setdefault(p["ParentId"], []).append(p)
    for pid in sorted(posts):
        q = posts[pid]
        if q["PostTypeId"] != 1:
            continue
        yield Document(f"{source}/{pid}", q.get("Body", ""), source, f"{path}#Id={pid}",
                       {"question": q, "answers": answers.get(pid, [])})
