"""Wikipedia: pages from a MediaWiki XML dump (.xml / .xml.bz2), wikitext to plain text.

Markup is parsed with ``mwparserfromhell`` (a maintained wikitext parser; regexes break on nested
templates) and rendered to text in one pass that leaves out comments, templates (infoboxes,
citations), ``<ref>`` and table/gallery/math tags, and File/Image/Category links (their captions
are not prose); link text, bold/italic contents and entities are kept. Headings are kept as their own lines. Redirects,
non-article namespaces and near-empty pages are dropped with a reason.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

from llamalab.common import LlamalabError
from llamalab.data.clean import CleanResult, drop
from llamalab.data.readers import Document, open_binary

DROP_TAGS = {"ref", "table", "gallery", "math", "timeline", "imagemap", "references", "score", "syntaxhighlight",
             "source", "code", "chem", "graph", "mapframe", "templatestyles"}
_MEDIA = re.compile(r"^\s*:?\s*(file|image|category|media)\s*:", re.IGNORECASE)
_REDIRECT = re.compile(r"^\s*#redirect", re.IGNORECASE)
_BLANKS = re.compile(r"\n{3,}")


def _render(code) -> str:
    """Text of a parsed wikicode, one pass over its nodes.

    NOTE: ``Wikicode.remove(node)`` searches the whole tree on every call (quadratic: ~0.2 s a
    page on the shared dump), so we render instead of removing and then calling ``strip_code``.
    """
    from mwparserfromhell import nodes as N  # optional extra: llamalab[data]

    out: list[str] = []
    for node in code.nodes:
        if isinstance(node, N.Text):
            out.append(str(node.value))
        elif isinstance(node, N.Wikilink):
            if not _MEDIA.match(str(node.title)):
                out.append(_render(node.text) if node.text is not None else _render(node.title))
        elif isinstance(node, N.ExternalLink):
            if node.title is not None:
                out.append(_render(node.title))
        elif isinstance(node, N.Heading):
            out.append("\n" + _render(node.title).strip() + "\n")
        elif isinstance(node, N.Tag):
            tag = str(node.tag).lower()
            if tag in ("br", "p"):
                out.append("\n")
            if tag not in DROP_TAGS and node.contents is not None:
                out.append(_render(node.contents))
        elif isinstance(node, N.HTMLEntity):
            out.append(node.normalize())
        # templates, comments, arguments: dropped
    return "".join(out)


_REF = re.compile(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>", re.DOTALL | re.IGNORECASE)
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_LINK = re.compile(r"\[\[(?:[^\]|]*\|)?([^\]]*)\]\]")
_HTML = re.compile(r"</?[A-Za-z][^>]*>")


def _leftovers(text: str) -> str:
    """Remove markup the parser left as text.

    NOTE: on malformed pages (an unbalanced quote in a table attribute, stray bold quotes) the
    parser gives up on a span and returns it as plain text; several of the first 40 shared pages
    hit this. Regexes clean up the usual survivors: refs, tables, templates, links, bold/italics.
    """
    text = _REF.sub("", text)
    for _ in range(3):
        text = _TEMPLATE.sub("", text)
    text = _LINK.sub(r"\1", text)
    text = _HTML.sub("", text)
    out, depth = [], 0
    for line in text.splitlines():
        s = line.lstrip()
        if s.startswith("{|"):
            depth += 1
            continue
        if depth and s.startswith("|}"):
            depth -= 1
            continue
        if depth or s.startswith(("|", "!")):
            continue
        out.append(line)
    return "\n".join(out).replace("'''", "").replace("''", "")


def wikitext_to_text(markup: str) -> str:
    """Plain text of a wikitext page (no templates, refs, tables, media links or comments)."""
    import mwparserfromhell  # optional extra: llamalab[data]

    text = _leftovers(_render(mwparserfromhell.parse(markup)))
    lines = [re.sub(r"[ \t]+", " ", ln).strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if not re.fullmatch(r"[\W_]*", ln) or not ln]  # leftover punctuation rows
    return _BLANKS.sub("\n\n", "\n".join(lines)).strip()


def clean_wiki(markup: str, min_words: int = 20) -> CleanResult:
    if _REDIRECT.match(markup):
        return drop("wiki:redirect")
    if re.search(r"\{\{\s*(disambiguation|disambig|dab)\b", markup, re.IGNORECASE):
        return drop("wiki:disambiguation")
    text = wikitext_to_text(markup)
    if len(text.split()) < min_words:
        return drop("wiki:too_short", CleanResult(None))
    return CleanResult(text)


def read_dump(path: str | Path, source: str = "wikipedia", namespaces: tuple[int, ...] = (0,)) -> Iterator[Document]:
    """Pages of a dump as Documents (raw wikitext; ``meta`` has title, namespace, redirect)."""
    path = Path(path)
    with open_binary(path) as f:
        try:
            for _, el in ET.iterparse(f, events=("end",)):
                if el.tag.rsplit("}", 1)[-1] != "page":
                    continue
                ns = {c.tag.rsplit("}", 1)[-1]: c for c in el}
                title = ns["title"].text or ""
                namespace = int(ns["ns"].text or 0) if "ns" in ns else 0
                page_id = ns["id"].text if "id" in ns else title
                text_el = next((t for t in el.iter() if t.tag.endswith("}text") or t.tag == "text"), None)
                text = (text_el.text or "") if text_el is not None else ""
                el.clear()
                if namespace not in namespaces:
                    continue
                yield Document(f"{source}/{page_id}", text, source, f"{path}#page={page_id}",
                               {"title": title, "ns": namespace, "redirect": "redirect" in ns})
        except ET.ParseError as e:
            raise LlamalabError(f"{path}: not a readable MediaWiki XML dump ({e})") from None
