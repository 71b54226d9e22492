"""Fixtures for the data pipeline tests: cleaned real Wikipedia text (a reference corpus) and
Botchan paragraphs, cached per session because parsing wikitext takes a few seconds."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from tests.conftest import shared_path


@pytest.fixture(scope="session")
def wiki_texts() -> list[str]:
    """Plain text of the first 40 non-redirect articles of the shared enwiki dump."""
    from llamalab.data.clean.wiki import clean_wiki, read_dump

    out = []
    for doc in read_dump(shared_path("corpus/enwiki_markup.xml.bz2")):
        if doc.meta["redirect"]:
            continue
        res = clean_wiki(doc.text)
        if res.kept:
            out.append(res.text)
        if len(out) == 40:
            break
    return out


@pytest.fixture(scope="session")
def botchan_paragraphs(botchan_text) -> list[str]:
    """The novel's body (inside the Gutenberg markers) in chunks of 10 lines (~100 words).

    NOTE: this copy of Botchan has almost no blank lines between paragraphs, hence fixed chunks.
    """
    lines = [ln.strip() for ln in botchan_text.splitlines()]
    start = next(i for i, ln in enumerate(lines) if ln.startswith("*** START")) + 1
    end = next(i for i, ln in enumerate(lines) if ln.startswith("*** END"))
    body = [ln for ln in lines[start:end] if ln]
    chunks = [" ".join(body[i:i + 10]) for i in range(0, len(body), 10)]
    return [c for c in chunks if len(c.split()) >= 60]


def jsonl_rows(*paths: Path) -> list[dict]:
    """Every JSON line of the given files (.gz read as gzip), in order."""
    rows = []
    for p in paths:
        opener = gzip.open if str(p).endswith(".gz") else open
        with opener(p, "rt", encoding="utf-8") as f:
            rows += [json.loads(line) for line in f if line.strip()]
    return rows
