"""``llamalab data which-step``: the table printed from a which_step answer (the answer itself is
checked against what the trainer fed in tests/train/test_pretrain.py)."""

from llamalab.data.order import format_step


def test_format_step_lists_sequences_and_first_documents():
    docs = [{"id": f"d{i}", "source": "s", "provenance": f"f.txt:{i}"} for i in range(5)]
    info = {"step": 4, "batch": 5, "windows": [
        {"window": 9, "shard": "train_00000.bin", "start": 0, "end": 65, "documents": docs},
        {"window": 2, "shard": "train_00001.bin", "start": 64, "end": 129, "documents": docs[:1]},
    ]}
    assert format_step(info).splitlines() == [
        "step 4 read global batch 5 (2 sequences):",
        "  train_00000.bin [0:65)  d0 (f.txt:0); d1 (f.txt:1); d2 (f.txt:2) +2 more",
        "  train_00001.bin [64:129)  d0 (f.txt:0)",
    ]
