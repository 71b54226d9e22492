"""arXiv LaTeX sources, the RedPajama/LLaMA recipe: remove comments, inline-expand user macros
(``\\newcommand``/``\\renewcommand``/``\\def``, with ``#1``.. arguments), drop everything before the
first section and the bibliography (and anything after it).

Trade-offs: macro expansion is textual and bounded (``max_passes``), like the recipe's regexes,
not a TeX engine: a macro with optional arguments (``\\newcommand{\\x}[2][def]{..}``) is expanded
with its default and only required braces are parsed; a definition that is not understood is
left in place rather than guessed.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from llamalab.data.clean import CleanResult, drop
from llamalab.data.readers import Document

_COMMENT = re.compile(r"(?<!\\)%.*$", re.MULTILINE)
_SECTION = re.compile(r"\\(section|chapter)\*?\s*[\[{]")
_BIB = re.compile(r"\\begin\{thebibliography\}|\\bibliography\{|\\printbibliography|\\begin\{references\}")
_NEWCMD = re.compile(r"\\(?:re)?newcommand\*?\s*\{?\s*(\\[A-Za-z@]+)\s*\}?\s*(?:\[(\d)\])?\s*(?:\[([^\]]*)\])?\s*\{")
_DEF = re.compile(r"\\def\s*(\\[A-Za-z@]+)\s*((?:#\d)*)\s*\{")


def remove_comments(src: str) -> str:
    lines = []
    for line in src.splitlines():
        if line.lstrip().startswith("%"):
            continue  # whole-line comment: the line goes, not just its text
        lines.append(_COMMENT.sub("", line).rstrip())
    return "\n".join(lines)


def _braced(s: str, i: int) -> tuple[str, int] | None:
    """Contents of the brace group opening at s[i] == '{', and the index after it."""
    if i >= len(s) or s[i] != "{":
        return None
    depth = 0
    for j in range(i, len(s)):
        c = s[j]
        if c == "\\":
            continue
        if c == "{" and (j == 0 or s[j - 1] != "\\"):
            depth += 1
        elif c == "}" and s[j - 1] != "\\":
            depth -= 1
            if depth == 0:
                return s[i + 1:j], j + 1
    return None


def collect_macros(src: str) -> tuple[str, dict[str, tuple[int, str | None, str]]]:
    """(source without the definitions, {name: (n_args, default of #1 or None, body)})."""
    macros: dict[str, tuple[int, str | None, str]] = {}
    out, pos = [], 0
    while True:
        m1, m2 = _NEWCMD.search(src, pos), _DEF.search(src, pos)
        m = min((x for x in (m1, m2) if x), key=lambda x: x.start(), default=None)
        if m is None:
            break
        body = _braced(src, m.end() - 1)
        if body is None:
            out.append(src[pos:m.end()])
            pos = m.end()
            continue
        if m.re is _NEWCMD:
            n_args, default = int(m.group(2) or 0), m.group(3)
        else:
            n_args, default = len(m.group(2)) // 2, None
        macros[m.group(1)] = (n_args, default, body[0])
        out.append(src[pos:m.start()])
        pos = body[1]
    out.append(src[pos:])
    return "".join(out), macros


def expand_macros(src: str, macros: dict[str, tuple[int, str | None, str]], max_passes: int = 5) -> str:
    if not macros:
        return src
    names = sorted(macros, key=len, reverse=True)
    pat = re.compile("(" + "|".join(re.escape(n) for n in names) + r")(?![A-Za-z@])")
    for _ in range(max_passes):
        out, pos, changed = [], 0, False
        for m in pat.finditer(src):
            if m.start() < pos:
                continue
            n_args, default, body = macros[m.group(1)]
            j, args = m.end(), []
            if default is not None:
                if j < len(src) and src[j] == "[":
                    k = src.find("]", j)
                    args.append(src[j + 1:k])
                    j = k + 1
                else:
                    args.append(default)
            while len(args) < n_args:
                while j < len(src) and src[j] == " ":
                    j += 1
                g = _braced(src, j)
                if g is None:
                    break
                args.append(g[0])
                j = g[1]
            if len(args) < n_args:
                continue  # malformed use: leave it
            text = body
            for a in range(n_args, 0, -1):
                text = text.replace(f"#{a}", args[a - 1])
            out.append(src[pos:m.start()] + text)
            pos, changed = j, True
        out.append(src[pos:])
        src = "".join(out)
        if not changed:
            break
    return src


def clean_latex(src: str, min_chars: int = 500) -> CleanResult:
    text = remove_comments(src)
    text, macros = collect_macros(text)
    text = expand_macros(text, macros)
    sec = _SECTION.search(text)
    if sec is None:
        return drop("arxiv:no_section")
    text = text[sec.start():]
    bib = _BIB.search(text)
    if bib is not None:
        text = text[:bib.start()]
    text = text.replace("\\end{document}", "").strip()
    text = re.sub(r"\n{3,}", "\n\n", text)
    if len(text) < min_chars:
        return drop("arxiv:too_short")
    res = CleanResult(text)
    res.meta["macros_expanded"] = len(macros)
    return res


def read_tex(paths: list[Path], source: str = "arxiv") -> Iterator[Document]:
    for p in paths:
        if p.suffix == ".tex":
            yield Document(f"{source}/{p.stem}", p.read_text(encoding="utf-8", errors="replace"), source, f"{p}:1")
