"""Wikipedia: pages from a MediaWiki XML dump (.xml / .xml.bz2), wikitext to plain text.

Markup is tokenized with ``mwparserfromhell`` (a maintained wikitext parser; regexes break on nested
templates) and its tokens rendered to text in one pass (no node tree) that leaves out comments, templates (infoboxes,
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


class _TokenRenderer:
    """:func:`_render` on mwparserfromhell's token list, without building its node tree.

    NOTE: building the tree (``Builder``: a ``Wikicode`` and re-parsed arguments for every node) is
    ~3/4 of ``mwparserfromhell.parse`` on the shared dump; this walks the tokens with the Builder's
    own nesting rules (same handlers, same stack discipline for tags) and renders as it goes. A
    node is ``(text, raw)``: ``raw`` is a Text node's string, None for any other node; a wikilink
    title or a tag name is matched on its leading raw text with ``"\\x00"`` where a non-text node
    starts (whose markup, ``{{``, ``<!--``, ``&``..., can match neither). The tests check it
    gives :func:`_render`'s text on every page of the shared dump.
    """

    def __init__(self, toks: list) -> None:
        from mwparserfromhell.nodes import HTMLEntity  # optional extra: llamalab[data]
        from mwparserfromhell.parser import tokens as T

        self.T, self.entity = T, HTMLEntity
        self.toks, self.i = toks, 0
        self.handlers = {T.TemplateOpen: self.template, T.ArgumentOpen: self.argument, T.WikilinkOpen: self.wikilink,
                         T.ExternalLinkOpen: self.external_link, T.HTMLEntityStart: self.html_entity,
                         T.HeadingStart: self.heading, T.CommentStart: self.comment, T.TagOpenOpen: self.tag}

    def next(self):
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def node(self, tok) -> tuple[str, str | None]:
        if type(tok) is self.T.Text:
            return tok["text"], tok["text"]
        return self.handlers[type(tok)](tok)

    def render(self) -> str:
        out = []
        while self.i < len(self.toks):
            out.append(self.node(self.next())[0])
        return "".join(out)

    @staticmethod
    def text(nodes: list) -> str:
        return "".join(t for t, _ in nodes)

    @staticmethod
    def raw_prefix(nodes: list) -> str:
        out = []
        for _, raw in nodes:
            if raw is None:
                out.append("\x00")
                break
            out.append(raw)
        return "".join(out)

    def skip_until(self, close, *ignored) -> tuple[str, None]:
        """A dropped node (template, argument, comment): consume it, nested nodes included."""
        while True:
            tok = self.next()
            if type(tok) is close:
                return "", None
            if type(tok) not in ignored:
                self.node(tok)

    def template(self, _tok):
        return self.skip_until(self.T.TemplateClose, self.T.TemplateParamSeparator, self.T.TemplateParamEquals)

    def argument(self, _tok):
        return self.skip_until(self.T.ArgumentClose, self.T.ArgumentSeparator)

    def comment(self, _tok):
        return self.skip_until(self.T.CommentEnd)

    def _two_part(self, sep, close) -> tuple[list, list | None]:
        first, second, cur = [], None, None
        cur = first
        while True:
            tok = self.next()
            if type(tok) is sep:
                second = cur = []
            elif type(tok) is close:
                return first, second
            else:
                cur.append(self.node(tok))

    def wikilink(self, _tok):
        title, text = self._two_part(self.T.WikilinkSeparator, self.T.WikilinkClose)
        if _MEDIA.match(self.raw_prefix(title)):
            return "", None
        return self.text(text if text is not None else title), None

    def external_link(self, _tok):
        _url, title = self._two_part(self.T.ExternalLinkSeparator, self.T.ExternalLinkClose)
        return (self.text(title) if title is not None else ""), None

    def html_entity(self, _tok):
        T, tok = self.T, self.next()
        if type(tok) is T.HTMLEntityNumeric:
            tok = self.next()
            if type(tok) is T.HTMLEntityHex:
                text = self.next()
                self.next()  # HTMLEntityEnd
                node = self.entity(text["text"], named=False, hexadecimal=True, hex_char=tok["char"])
            else:
                self.next()
                node = self.entity(tok["text"], named=False, hexadecimal=False)
        else:
            self.next()
            node = self.entity(tok["text"], named=True, hexadecimal=False)
        return node.normalize(), None

    def heading(self, _tok):
        title = []
        while True:
            tok = self.next()
            if type(tok) is self.T.HeadingEnd:
                return "\n" + self.text(title).strip() + "\n", None
            title.append(self.node(tok))

    def attribute(self) -> None:
        T = self.T
        while True:
            tok = self.next()
            if type(tok) in (T.TagAttrStart, T.TagCloseOpen, T.TagCloseSelfclose):
                self.i -= 1
                return
            if type(tok) not in (T.TagAttrEquals, T.TagAttrQuote):
                self.node(tok)

    def tag(self, _tok):
        T = self.T
        name = contents = None
        stack: list = []
        while True:
            tok = self.next()
            kind = type(tok)
            if kind is T.TagAttrStart:
                self.attribute()
            elif kind is T.TagCloseOpen:
                name, stack = stack, []
            elif kind is T.TagOpenClose:
                contents, stack = stack, []
            elif kind is T.TagCloseSelfclose or kind is T.TagCloseClose:
                if kind is T.TagCloseSelfclose:
                    name = stack
                tag = self.raw_prefix(name).lower()
                out = "\n" if tag in ("br", "p") else ""
                if tag not in DROP_TAGS and contents is not None:
                    out += self.text(contents)
                return out, None
            else:
                stack.append(self.node(tok))


def _parse_render(markup: str) -> str:
    """``_render(mwparserfromhell.parse(markup))``, from the tokens (:class:`_TokenRenderer`)."""
    import mwparserfromhell  # optional extra: llamalab[data]

    tokenizer = getattr(mwparserfromhell.parser.Parser(), "_tokenizer", None)
    if tokenizer is None:  # another mwparserfromhell layout: the tree, as before
        return _render(mwparserfromhell.parse(markup))
    return _TokenRenderer(tokenizer.tokenize(markup, 0, False)).render()


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
    text = _leftovers(_parse_render(markup))
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
