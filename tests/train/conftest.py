from __future__ import annotations

import pytest

from llamalab.data.readers import read_documents
from llamalab.data.shards import ShardWriterConfig, write_shards
from tests.conftest import shared_path


@pytest.fixture(scope="session")
def botchan_shards(tmp_path_factory, botchan_tokenizer):
    """Botchan as ~40 paragraph-ish documents (chunks of 100 lines), tokenized into shards."""
    text = shared_path("corpus/botchan.txt").read_text(encoding="utf-8-sig").splitlines()
    d = tmp_path_factory.mktemp("docs")
    for i in range(0, len(text), 100):
        (d / f"botchan_{i // 100:03d}.txt").write_text("\n".join(text[i:i + 100]), encoding="utf-8")
    out = tmp_path_factory.mktemp("shards")
    write_shards(list(read_documents([d], source="books")), botchan_tokenizer, out,
                 ShardWriterConfig(shard_tokens=30_000, val_fraction=0.1))
    return out


def small_config(data, run_dir, **kw):
    from llamalab.commands.pretrain import Config
    from llamalab.config import from_dict

    base = dict(data=str(data), run_dir=str(run_dir), preset="tiny",
                model_overrides={"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 64},
                seq_len=64, global_batch_tokens=64 * 8, micro_batch_size=4, steps=12, checkpoint_interval=4,
                eval_interval=4, eval_batches=2, peak_flops=1e11, seed=7)
    base.update(kw)
    return from_dict(Config, base)
