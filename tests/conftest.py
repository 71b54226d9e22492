"""Shared fixtures: the shared data folder, a tiny model config, a tiny real corpus, a trained
tiny tokenizer, and a 2-process gloo runner for distributed tests."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LLAMALAB_SHARED", ROOT.parent / "shared")) / "data"

torch.set_num_threads(min(2, os.cpu_count() or 1))


def shared_path(rel: str) -> Path:
    p = SHARED / rel
    if not p.exists():
        pytest.skip(f"shared test data not found: {p}")
    return p


@pytest.fixture(scope="session")
def shared() -> Path:
    if not SHARED.exists():
        pytest.skip(f"shared test data not found: {SHARED}")
    return SHARED


@pytest.fixture
def tiny_config():
    from llamalab.model import ModelConfig

    return ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, multiple_of=16,
                       max_seq_len=64)


@pytest.fixture(scope="session")
def botchan_text() -> str:
    return shared_path("corpus/botchan.txt").read_text(encoding="utf-8-sig")


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory, botchan_text) -> Path:
    """A folder with a few real text files (Botchan split into 4 parts)."""
    d = tmp_path_factory.mktemp("corpus")
    lines = botchan_text.splitlines()
    q = len(lines) // 4
    for i in range(4):
        (d / f"part{i}.txt").write_text("\n".join(lines[i * q:(i + 1) * q]) + "\n", encoding="utf-8")
    return d


@pytest.fixture(scope="session")
def botchan_tokenizer(tmp_path_factory):
    """A 1000-piece LLaMA-style BPE tokenizer trained on Botchan (cached for the session)."""
    from llamalab.tokenizer import TokenizerTrainConfig, train_tokenizer

    out = tmp_path_factory.mktemp("tok")
    tok, _ = train_tokenizer(TokenizerTrainConfig(inputs=[str(shared_path("corpus/botchan.txt"))],
                                                  output=str(out), vocab_size=1000))
    return tok


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_gloo(fn, world_size: int = 2, *args) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` processes with a gloo process group.

    ``fn`` must be importable (a module-level function). Raises if any rank fails.
    """
    import torch.multiprocessing as mp

    # NOTE: free_port() closes its socket before gloo binds the port, so another process can take it
    # in between; a bind failure (and only that) is retried on a fresh port.
    for attempt in range(3):
        try:
            mp.start_processes(_gloo_entry, args=(world_size, free_port(), fn, args), nprocs=world_size,
                               join=True, start_method="spawn")
            return
        except Exception as e:  # torch.multiprocessing.ProcessRaisedException carries the rank's traceback
            if attempt == 2 or not any(m in str(e) for m in ("Address already in use", "EADDRINUSE")):
                raise


def _gloo_entry(rank: int, world_size: int, port: int, fn, args) -> None:
    import faulthandler

    import torch.distributed as dist

    faulthandler.enable(all_threads=True)  # a rank killed by a signal prints where each thread was
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
        # NOTE: a rank that tears gloo down while its peer is still in a collective (a checkpoint's
        # last all-gather, say) can abort the peer at exit ("terminate called without an active
        # exception", seen under load); meet first.
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # NOTE: even after the barrier, a rank was seen to abort with that message after its work was done
    # (CI, FSDP SFT, once in ~1000 runs): a C++ thread still joinable when the interpreter's finalisation
    # destroys what holds it. Spawned children otherwise finalise in full (sys.exit); end this one here, its
    # results written and its output flushed, as a forked child would.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.fixture
def gloo_runner():
    return run_gloo
