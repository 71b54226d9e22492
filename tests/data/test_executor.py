from pathlib import Path

import pytest

from llamalab.common import LlamalabError
from llamalab.data.executor import is_done, run_tasks


def write_square(task: dict) -> dict:
    """A shard task: writes its output file and logs that it ran (module level: picklable)."""
    out = Path(task["out"])
    if task["index"] == task.get("crash_at", -1):
        raise RuntimeError("simulated crash")
    (out / f"{task['name']}.txt").write_text(str(task["index"] ** 2))
    with open(out / "log.txt", "a") as f:
        f.write(task["name"] + "\n")
    return {"square": task["index"] ** 2}


def _tasks(out: Path, n: int, **extra) -> list[dict]:
    return [{"name": f"s{i}", "index": i, "out": str(out), **extra} for i in range(n)]


def test_interrupted_run_resumes_without_redoing(tmp_path):
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_tasks(write_square, _tasks(tmp_path, 6, crash_at=3), tmp_path / "stage")
    assert (tmp_path / "log.txt").read_text().split() == ["s0", "s1", "s2"]
    assert [is_done(tmp_path / "stage", f"s{i}") for i in range(6)] == [True] * 3 + [False] * 3
    res = run_tasks(write_square, _tasks(tmp_path, 6), tmp_path / "stage")
    assert (tmp_path / "log.txt").read_text().split() == ["s0", "s1", "s2", "s3", "s4", "s5"]
    assert res == [{"square": i * i} for i in range(6)]


def test_two_processes_same_results_in_task_order(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = run_tasks(write_square, _tasks(tmp_path / "a", 7), tmp_path / "a" / "stage", workers=1)
    b = run_tasks(write_square, _tasks(tmp_path / "b", 7), tmp_path / "b" / "stage", workers=2)
    assert a == b == [{"square": i * i} for i in range(7)]
    for i in range(7):
        assert (tmp_path / "a" / f"s{i}.txt").read_bytes() == (tmp_path / "b" / f"s{i}.txt").read_bytes()


def test_bad_executor_settings(tmp_path):
    with pytest.raises(LlamalabError, match="executor must be one of"):
        run_tasks(write_square, _tasks(tmp_path, 1), tmp_path / "st", executor="dask")
    with pytest.raises(LlamalabError, match="unique"):
        run_tasks(write_square, _tasks(tmp_path, 2) * 2, tmp_path / "st")


@pytest.mark.parametrize("name,module", [("ray", "ray"), ("spark", "pyspark")])
def test_distributed_adapters(tmp_path, name, module):
    try:
        __import__(module)
    except ImportError:
        with pytest.raises(LlamalabError, match=f"needs the '{module}' package"):
            run_tasks(write_square, _tasks(tmp_path, 2), tmp_path / "st", executor=name)
        return
    res = run_tasks(write_square, _tasks(tmp_path, 3), tmp_path / "st", executor=name)
    assert res == [{"square": i * i} for i in range(3)]
