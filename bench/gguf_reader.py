"""GGUF header reading: llamalab's bounds-checked reader vs the `gguf` package's GGUFReader, same file, same run.

Both sides produce the metadata as Python values (what the loader needs before it touches tensor
data): ours is ``read_gguf(path).kv``; the peer is ``GGUFReader(path)`` plus the conversion of each
field's parts to values. Rounds alternate so machine noise hits both. Usage::

    python bench/gguf_reader.py [FILE.gguf] [--rounds 5]

Default file: ../shared/data/tokenizer/llama_spm/ggml-vocab-llama-spm.gguf (LLaMA's 32k vocabulary).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

DEFAULT = Path(__file__).resolve().parents[1].parent / "shared/data/tokenizer/llama_spm/ggml-vocab-llama-spm.gguf"


def peer(path: Path) -> dict:
    import gguf

    reader = gguf.GGUFReader(str(path))
    out = {}
    for name, f in reader.fields.items():
        if not f.types or name.startswith("GGUF."):  # the header's counts, not metadata keys
            continue
        if f.types[0] == gguf.GGUFValueType.ARRAY:
            vals = [f.parts[i] for i in f.data]
            if f.types[-1] == gguf.GGUFValueType.STRING:
                out[name] = [bytes(v).decode("utf-8", "replace") for v in vals]
            else:
                out[name] = [v.tolist()[0] for v in vals]
        elif f.types[0] == gguf.GGUFValueType.STRING:
            out[name] = bytes(f.parts[f.data[0]]).decode("utf-8", "replace")
        else:
            out[name] = f.parts[f.data[0]].tolist()[0]
    return out


def ours(path: Path) -> dict:
    from llamalab.interop.gguf import read_gguf

    return dict(read_gguf(path).kv)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("file", nargs="?", default=str(DEFAULT))
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    path = Path(args.file)
    a, b = ours(path), peer(path)  # warm-up, and the two must agree on what they read
    same = [k for k in b if k in a and (a[k] == b[k] or (isinstance(a[k], float) and abs(a[k] - b[k]) < 1e-6))]
    print(f"{path.name}: {path.stat().st_size / 2**20:.1f} MiB, {len(b)} keys; {len(same)} equal in both readers")
    assert len(same) == len(b), f"the readers disagree on {sorted(set(b) - set(same))}"
    times: dict[str, list[float]] = {"llamalab read_gguf": [], "gguf GGUFReader + fields": []}
    for _ in range(args.rounds):
        for name, fn in (("llamalab read_gguf", ours), ("gguf GGUFReader + fields", peer)):
            t = time.perf_counter()
            fn(path)
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"  {k:<26} {v * 1000:8.1f} ms (median of {args.rounds})")
    print(f"  ratio peer / ours          {med['gguf GGUFReader + fields'] / med['llamalab read_gguf']:8.1f}x"
          f"   (load average {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
