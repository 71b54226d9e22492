"""The sandbox fails safely: writes outside its temp dir, sockets, endless loops, memory, processes."""

from __future__ import annotations

import gzip
import json
import socket
import threading
import time

import pytest

from llamalab.eval.sandbox import humaneval_program, run_python
from tests.conftest import shared_path


def test_normal_program_runs_in_its_own_temp_dir():
    r = run_python("import os\nopen('scratch.txt', 'w').write('ok')\nprint(open('scratch.txt').read(), os.getcwd())")
    assert r.passed, r.stderr
    word, cwd = r.stdout.split()
    assert word == "ok" and "llamalab-sbx-" in cwd
    r2 = run_python(f"import os\nprint(os.path.exists({cwd + '/scratch.txt'!r}))")
    assert r2.stdout.strip() == "False"  # the temp dir was removed


def test_environment_is_stripped(monkeypatch):
    monkeypatch.setenv("LLAMALAB_SECRET_TOKEN", "hunter2")
    r = run_python("import os\nprint(sorted(os.environ))")
    assert r.passed and "LLAMALAB_SECRET_TOKEN" not in r.stdout


@pytest.mark.parametrize("code", [
    "open({target!r}, 'w').write('pwned')",
    "import os\nfd = os.open({target!r}, os.O_WRONLY | os.O_CREAT)\nos.write(fd, b'pwned')",
    "import pathlib\npathlib.Path({target!r}).write_text('pwned')",
    "try:\n    open({target!r}, 'a').write('pwned')\nexcept BaseException:\n    pass\nprint('survived')",
])
def test_write_outside_temp_dir_is_blocked(tmp_path, code):
    target = tmp_path / "outside.txt"
    r = run_python(code.format(target=str(target)))
    assert r.status == "blocked" and not r.passed
    assert "blocked write" in r.stderr and "survived" not in r.stdout
    assert not target.exists()


def test_delete_outside_temp_dir_is_blocked(tmp_path):
    victim = tmp_path / "keep.txt"
    victim.write_text("precious")
    r = run_python(f"import os\nos.remove({str(victim)!r})")
    assert r.status == "blocked" and victim.read_text() == "precious"


def test_socket_is_blocked():
    got = []
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(1)
    port = srv.getsockname()[1]

    def accept() -> None:
        try:
            got.append(srv.accept())
        except OSError:
            pass

    th = threading.Thread(target=accept)
    th.start()
    r = run_python(f"import socket\ns = socket.create_connection(('127.0.0.1', {port}))\n"
                   "s.sendall(b'hi')\nprint('sent')")
    th.join()
    srv.close()
    assert not r.passed and "sent" not in r.stdout
    assert got == []  # nothing reached the listener


def test_endless_loop_times_out():
    t0 = time.perf_counter()
    r = run_python("while True:\n    pass", timeout=1.5)
    assert r.status == "timeout" and not r.passed
    assert time.perf_counter() - t0 < 10


def test_sleeping_program_is_killed_at_the_wall_timeout():
    r = run_python("import time\ntime.sleep(60)", timeout=1.0)
    assert r.status == "timeout" and r.seconds < 10


def test_memory_limit():
    r = run_python("x = bytearray(3 << 30)\nprint('allocated')", memory_mb=512)
    assert r.status == "failed" and "MemoryError" in r.stderr and "allocated" not in r.stdout


def test_processes_are_blocked():
    for code in ("import subprocess\nsubprocess.run(['true'])", "import os\nos.system('true')", "import os\nos.fork()"):
        r = run_python(code)
        assert r.status == "blocked", (code, r)


def test_humaneval_canonical_solutions_pass_and_wrong_ones_fail():
    with gzip.open(shared_path("eval/HumanEval.jsonl.gz"), "rt", encoding="utf-8") as f:
        problems = [json.loads(line) for line in f][:6]
    for p in problems:
        r = run_python(humaneval_program(p, p["canonical_solution"]))
        assert r.passed, (p["task_id"], r.stderr)
    r = run_python(humaneval_program(problems[0], "    return None\n"))
    assert r.status == "failed" and "AssertionError" in r.stderr
