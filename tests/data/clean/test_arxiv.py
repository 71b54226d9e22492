import pytest

from llamalab.data.clean.arxiv import clean_latex, collect_macros, expand_macros
from tests.conftest import shared_path

SRC = r"""\documentclass{article}
\newcommand{\model}{MaLLaM}
\newcommand{\vect}[1]{\mathbf{#1}}
\renewcommand{\pair}[2]{(#1, #2)}
\def\eps{\varepsilon}
\begin{document}
\title{Front matter that must go}
\section{Intro} % a comment to remove
% a whole comment line
We train \model{} on \vect{x} with \eps and \pair{a}{b}; 100\% of it.
\section{More}
Text.
\bibliography{refs}
after the bibliography
\end{document}
"""


def test_macros_comments_front_and_bibliography():
    res = clean_latex(SRC, min_chars=10)
    assert res.kept
    assert res.text.splitlines() == ["\\section{Intro}",
                                     "We train MaLLaM{} on \\mathbf{x} with \\varepsilon and (a, b); 100\\% of it.",
                                     "\\section{More}", "Text."]
    assert res.meta["macros_expanded"] == 4


def test_nested_macro_expands():
    _, macros = collect_macros(r"\newcommand{\a}{A}\newcommand{\b}[1]{[\a #1]}")
    assert expand_macros(r"x \b{y} \ab", macros) == r"x [A y] \ab"


def test_no_section_is_dropped():
    assert clean_latex(r"\begin{document}just a note\end{document}").reason == "arxiv:no_section"


@pytest.mark.parametrize("name", ["2401.13565_malaysian-mistral", "2401.14680_mallam",
                                  "2402.03053_malaysian-embedding"])
def test_real_papers(name):
    src = shared_path(f"corpus/arxiv/{name}.tex").read_text(encoding="utf-8")
    res = clean_latex(src)
    assert res.text.startswith("\\section{Introduction}")
    assert "\\bibliography" not in res.text and "\\documentclass" not in res.text
    assert not any(line.lstrip().startswith("%") for line in res.text.splitlines())
    assert 0.3 * len(src) < len(res.text) < len(src)
