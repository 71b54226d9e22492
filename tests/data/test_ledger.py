
import pytest

from llamalab.common import LlamalabError
from llamalab.data.ledger import Ledger, open_rejects
from tests.data.conftest import jsonl_rows


def test_counts_merge_and_round_trip(tmp_path):
    a, b = Ledger(), Ledger()
    a.read, a.kept = 3, 2
    a.drop_doc("filter", "lang:fr", "x1", "bonjour")
    a.drop_lines("clean", "c4:cookie", "x2", ["we use cookies", "accept cookies"])
    b.read, b.kept = 2, 0
    b.drop_doc("filter", "lang:fr", "y1", "salut")
    b.drop_doc("dedup", "exact", "y2", "dup")
    a.merge(b)
    a.check()
    assert a.docs[("filter", "lang:fr")] == 2 and a.lines[("clean", "c4:cookie")] == 2
    assert [e["id"] for e in a.examples["filter/lang:fr"]] == ["x1", "y1"]
    a.save(tmp_path / "stats.json")
    back = Ledger.load(tmp_path / "stats.json")
    assert back.to_dict() == a.to_dict()
    table = a.summary_table()
    assert "lang:fr" in table and "read 5 / kept 2" in table


def test_check_fails_when_a_document_is_unaccounted():
    led = Ledger(read=2, kept=1)
    with pytest.raises(LlamalabError, match="does not add up"):
        led.check()


def test_rejects_file(tmp_path):
    f = open_rejects(tmp_path / "r" / "rejects.jsonl.gz")
    led = Ledger(rejects=f)
    led.drop_doc("filter", "gopher:stop_words", "d1", "text one")
    f.close()

    rows = jsonl_rows(tmp_path / "r" / "rejects.jsonl.gz")
    assert rows == [{"id": "d1", "stage": "filter", "reason": "gopher:stop_words", "text": "text one"}]
