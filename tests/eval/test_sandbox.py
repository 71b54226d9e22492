"""The code sandbox holds: escape attempts fail at the OS layer (namespaces, read-only root, no network,
unprivileged uid), pass/fail comes from the completion token, and resources stay bounded.

Escape tests run with the audit hook switched off (``audit_hook=False``) so that only the OS isolation
stands between the program and the host, in every isolation mode that works here (``root`` and
``userns`` when the tests run as root). Each one also checks, from inside, that its target is really
there (visible, or reachable without the sandbox), so that a passing test means "blocked", not
"aimed at nothing".
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from functools import lru_cache
from pathlib import Path

import pytest

from llamalab.common import LlamalabError
from llamalab.eval import sandbox as S
from llamalab.eval.sandbox import humaneval_program, run_python
from llamalab.eval.sandbox_child import HIDE
from tests.conftest import ROOT, shared_path


@lru_cache(maxsize=None)
def _works(mode: str) -> bool:
    try:
        return run_python("pass", mode=mode).passed
    except LlamalabError:
        return False


@pytest.fixture(params=["root", "userns"])
def mode(request) -> str:
    """Each isolation mode that works here (both, when the tests run as root on a normal kernel)."""
    if not _works(request.param):
        pytest.skip(f"isolation mode {request.param!r} unavailable here")
    return request.param


@pytest.fixture
def isolated() -> str:
    if S.isolation() == "none":
        pytest.skip("no OS isolation here (namespaces unavailable)")
    return S.isolation()


@pytest.fixture(autouse=True)
def _allow_where_no_isolation(monkeypatch):
    """Where namespaces are unavailable, the non-escape tests (token, limits, hook) still run, unsandboxed;
    the escape tests skip. The refusal tests remove this opt-in themselves."""
    if S.isolation() == "none":
        monkeypatch.setenv(S.ALLOW_ENV, "1")


def _visible_host_folder() -> Path:
    """A writable host folder the sandbox shows read-only: not under /tmp (private in the sandbox) nor a hidden
    one. NOTE: a checkout under /tmp (a CI clone) cannot hold it, so fall back to system folders (root in CI)."""
    hidden = ("/tmp", *HIDE)
    for base in (ROOT / "tests" / "eval", Path("/var/lib"), Path("/opt"), Path("/usr/local/share")):
        real = os.path.realpath(base)
        if not any(real == h or real.startswith(h + "/") for h in hidden) and os.access(base, os.W_OK):
            return base
    pytest.skip("no writable folder outside /tmp and the sandbox's hidden folders to attack")


@pytest.fixture
def host_dir():
    """A world-writable folder outside /tmp (so it is visible in the sandbox) with a world-writable file:
    only the read-only mount can stop writes there, not file permissions."""
    d = Path(tempfile.mkdtemp(prefix=".sandbox-victim-", dir=_visible_host_folder()))
    d.chmod(0o777)
    (d / "keep.txt").write_text("precious")
    (d / "keep.txt").chmod(0o666)
    yield d
    import shutil

    shutil.rmtree(d, ignore_errors=True)


def _untouched(d: Path) -> bool:
    return sorted(p.name for p in d.iterdir()) == ["keep.txt"] and (d / "keep.txt").read_text() == "precious"


# ----------------------------------------------------------------------------- ordinary programs


def test_normal_program_runs_in_a_private_writable_tmp():
    r = run_python("import os\nopen('scratch.txt', 'w').write('ok')\nprint(open('scratch.txt').read(), os.getcwd())")
    assert r.passed, (r.stderr, r.detail)
    word, cwd = r.stdout.split()
    assert word == "ok"
    r2 = run_python(f"import os\nprint(os.path.exists({cwd + '/scratch.txt'!r}))")
    assert r2.passed and r2.stdout.strip() == "False"  # nothing survives a run
    left = [p for p in os.listdir(tempfile.gettempdir()) if p.startswith("llamalab-sbx-")]
    assert not [p for p in left if os.path.getmtime(os.path.join(tempfile.gettempdir(), p)) > time.time() - 60]


def test_environment_is_stripped(monkeypatch):
    monkeypatch.setenv("LLAMALAB_SECRET_TOKEN", "hunter2")
    r = run_python("import os\nprint(sorted(os.environ))")
    assert r.passed and "LLAMALAB_SECRET_TOKEN" not in r.stdout and "hunter2" not in r.stdout


def test_runs_unprivileged_in_its_own_pid_and_network_namespace(isolated):
    r = run_python("import os, socket\nprint(os.getuid(), os.getpid(), sorted(n for _, n in socket.if_nameindex()))",
                   audit_hook=False)
    assert r.passed, r.stderr
    uid, pid, ifaces = r.stdout.split(maxsplit=2)
    assert uid == "65534" and int(pid) < 10 and ifaces.strip() == "['lo']"


# ----------------------------------------------------------------------------- audit hook (defence in depth)


@pytest.mark.parametrize("code", [
    "open({target!r}, 'w').write('pwned')",
    "import os\nfd = os.open({target!r}, os.O_WRONLY | os.O_CREAT)\nos.write(fd, b'pwned')",
    "import pathlib\npathlib.Path({target!r}).write_text('pwned')",
    "try:\n    open({target!r}, 'a').write('pwned')\nexcept BaseException:\n    pass\nprint('survived')",
])
def test_audit_hook_blocks_writes_outside(host_dir, code):
    target = host_dir / "outside.txt"
    r = run_python(code.format(target=str(target)))
    assert r.status == "blocked" and not r.passed
    assert "blocked write" in r.stderr and "survived" not in r.stdout
    assert _untouched(host_dir)


def test_audit_hook_blocks_delete_and_processes(host_dir):
    r = run_python(f"import os\nos.remove({str(host_dir / 'keep.txt')!r})")
    assert r.status == "blocked" and _untouched(host_dir)
    for code in ("import subprocess\nsubprocess.run(['true'])", "import os\nos.system('true')", "import os\nos.fork()",
                 "import os\nos.mkdir('d', dir_fd=os.open('/', os.O_RDONLY))"):
        r = run_python(code)
        assert r.status == "blocked", (code, r)


def test_audit_hook_cannot_be_switched_off_from_the_program(host_dir):
    target = host_dir / "hook.txt"
    code = ("import __main__, sys\n"
            "for name in ('_outside', '_DENY', '_deny', '_hook'):\n"
            "    setattr(__main__, name, (lambda *a: False) if name != '_DENY' else ())\n"
            f"open({str(target)!r}, 'w').write('pwned')\nprint('survived')")
    r = run_python(code)
    assert not r.passed and "survived" not in r.stdout and _untouched(host_dir)
    r = run_python("import sys\nsys.addaudithook(lambda *a: None)\nprint('added')")
    assert r.status == "blocked" and "added" not in r.stdout


# ----------------------------------------------------------------------------- escapes: the OS layer alone


@pytest.mark.parametrize("setattr_", [True, False], ids=["mount_setattr", "remount_each"])
def test_dir_fd_writes_hit_a_read_only_file_system(host_dir, mode, setattr_):
    """Both ways of making the tree read-only: one recursive mount_setattr (Linux >= 5.12), or the
    fallback that remounts every mount read-only one by one."""
    code = (f"import os\nfd = os.open({str(host_dir)!r}, os.O_RDONLY)\n"
            "print(open('keep.txt', opener=lambda p, f: os.open(p, f, dir_fd=fd)).read())\n"
            "for attempt in (lambda: os.open('new.txt', os.O_WRONLY | os.O_CREAT, dir_fd=fd),\n"
            "                lambda: os.open('keep.txt', os.O_WRONLY | os.O_TRUNC, dir_fd=fd),\n"
            "                lambda: os.mkdir('d', dir_fd=fd), lambda: os.unlink('keep.txt', dir_fd=fd),\n"
            "                lambda: os.rename('keep.txt', 'moved', src_dir_fd=fd, dst_dir_fd=fd)):\n"
            "    try:\n        attempt()\n        print('ESCAPED')\n    except OSError as e:\n        print(e.errno)\n")
    r = S._spawn(code, mode, 10.0, 1024, 16, 20_000, False, mount_setattr=setattr_)
    assert r.passed, r.stderr
    lines = r.stdout.split()
    assert lines[0] == "precious"  # the folder is visible: only the read-only mount stops the writes
    assert "ESCAPED" not in lines and set(lines[1:]) == {"30"}  # EROFS
    assert _untouched(host_dir)


def test_switching_off_the_hook_and_writing_anywhere_fails(host_dir, mode):
    code = (f"import __main__\n__main__._outside = lambda p: False\n__main__._DENY = ()\n"
            f"for path in ({str(host_dir / 'x.txt')!r}, '/etc/llamalab-pwned', '/usr/llamalab-pwned'):\n"
            "    try:\n        open(path, 'w').write('pwned')\n        print('ESCAPED', path)\n"
            "    except OSError as e:\n        print(e.errno)\n")
    r = run_python(code, mode=mode, audit_hook=False)
    assert r.passed and "ESCAPED" not in r.stdout, r.stdout + r.stderr
    assert _untouched(host_dir)
    assert not Path("/etc/llamalab-pwned").exists() and not Path("/usr/llamalab-pwned").exists()


FORK_EXEC = """
import _posixsubprocess, os
r, w = os.pipe()
out_r, out_w = os.pipe()
pid = _posixsubprocess.fork_exec(
    [b'/bin/sh', b'-c', {script!r}], [b'/bin/sh'], True, (w,), None, None,
    -1, -1, -1, out_w, -1, out_w, r, w, False, False, -1, None, None, -1, -1, None, False)
os.close(w); os.close(out_w)
os.waitpid(pid, 0)
print(os.read(out_r, 4000).decode())
"""


@pytest.mark.parametrize("hook", [True, False])
def test_fork_exec_shell_cannot_write_outside(host_dir, mode, hook):
    """``_posixsubprocess.fork_exec`` raises no audit event: the shell really runs, and is still confined."""
    script = (f"cat {host_dir}/keep.txt; echo; echo pwned > {host_dir}/sh.txt; echo pwned >> {host_dir}/keep.txt; "
              f"rm -f {host_dir}/keep.txt; echo pwned > /etc/llamalab-pwned; id -u; echo shell-done")
    r = run_python(FORK_EXEC.format(script=script.encode()), mode=mode, audit_hook=hook)
    assert "shell-done" in r.stdout and "precious" in r.stdout, r.stdout + r.stderr  # the shell did run
    assert "Read-only file system" in r.stdout and "65534" in r.stdout
    assert _untouched(host_dir) and not Path("/etc/llamalab-pwned").exists()


def test_signals_cannot_reach_the_parent(mode):
    got = []
    old = signal.signal(signal.SIGTERM, lambda *a: got.append(a))
    try:
        code = ("import os, signal\nprint('ppid', os.getppid())\n"
                f"for pid in (os.getppid(), {os.getpid()}, {os.getppid()}):\n"
                "    try:\n        os.kill(pid, signal.SIGTERM)\n        print('sent', pid)\n"
                "    except OSError as e:\n        print('refused', pid, e.errno)\n"
                f"print('parent visible', os.path.exists('/proc/{os.getpid()}'))\n")
        r = run_python(code, mode=mode, audit_hook=False)
        time.sleep(0.2)
    finally:
        signal.signal(signal.SIGTERM, old)
    assert got == [], "the sandbox signalled the test process"
    assert f"refused {os.getpid()} 3" in r.stdout and "parent visible False" in r.stdout  # ESRCH: not in its world
    assert r.passed, r.stdout + r.stderr  # its own supervisor (pid 1) ignored the SIGTERM, too


# A caller process without torch (llamalab.common imports it; the sandbox needs only LlamalabError from it).
LIGHT_IMPORT = ("import sys, types\nm = types.ModuleType('llamalab.common')\n"
                "m.LlamalabError = type('LlamalabError', (Exception,), {})\nsys.modules['llamalab.common'] = m\n")

PARENT = LIGHT_IMPORT + """
import json, sys
from llamalab.eval.sandbox import run_python
me = __import__('os').getpid()
outside = open(f'/proc/{me}/environ', 'rb').read()
code = (f"try:\\n    print(open('/proc/{me}/environ', 'rb').read())\\n"
        "except OSError as e:\\n    print('denied', e.errno)\\n"
        "import os\\nfor p in os.listdir('/proc'):\\n    if p.isdigit():\\n        try:\\n"
        "            print(p, open(f'/proc/{p}/environ', 'rb').read())\\n        except OSError:\\n            pass\\n")
r = run_python(code, mode=sys.argv[1], audit_hook=False)
print(json.dumps({"outside": b"LLAMALAB_TEST_SECRET=s3cr3t" in outside, "stdout": r.stdout, "passed": r.passed}))
"""


def test_parent_environment_is_not_readable(mode):
    env = {**os.environ, "LLAMALAB_TEST_SECRET": "s3cr3t"}
    out = subprocess.run([sys.executable, "-c", PARENT, mode], env=env, capture_output=True, text=True, timeout=60,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["outside"]  # the secret is in the parent's /proc/<pid>/environ: the test aims at something real
    assert res["passed"] and "s3cr3t" not in res["stdout"] and "denied 2" in res["stdout"], res


@pytest.mark.parametrize("hook", [True, False])
def test_network_connect_to_a_local_listener_fails(mode, hook):
    got = []
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(0.5)
    port = srv.getsockname()[1]

    def accept() -> None:
        try:
            got.append(srv.accept())
        except OSError:
            pass

    th = threading.Thread(target=accept)
    th.start()
    r = run_python(f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
                   "s.sendall(b'hi')\nprint('sent')", mode=mode, audit_hook=hook)
    th.join()
    srv.close()
    assert not r.passed and "sent" not in r.stdout
    assert got == []  # nothing reached the listener
    if not hook:
        assert "Network is unreachable" in r.stderr or "Connection refused" in r.stderr, r.stderr


def test_home_and_run_are_hidden_and_tmp_is_private(isolated, tmp_path):
    (tmp_path / "host-secret").write_text("x")
    code = ("import os\n"
            f"print(os.path.exists({str(tmp_path / 'host-secret')!r}), sorted(os.listdir('/home')),"
            " os.path.exists('/root/.bash_history'), sorted(os.listdir('/run')))")
    r = run_python(code, audit_hook=False)
    assert r.passed and r.stdout.strip() == "False [] False []", r.stdout + r.stderr


# ----------------------------------------------------------------------------- pass/fail from the token


@pytest.fixture(scope="module")
def problems():
    with gzip.open(shared_path("eval/HumanEval.jsonl.gz"), "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f][:6]


def test_humaneval_canonical_solutions_pass_and_wrong_ones_fail(problems):
    for p in problems:
        r = run_python(humaneval_program(p, p["canonical_solution"]))
        assert r.passed, (p["task_id"], r.stderr, r.detail)
    r = run_python(humaneval_program(problems[0], "    return None\n"))
    assert r.status == "failed" and "AssertionError" in r.stderr


@pytest.mark.parametrize("exit_line", [
    "import os; os._exit(0)",
    "import sys; sys.exit(0)",
    "raise SystemExit",
    "import os, signal; os.kill(os.getpid(), signal.SIGKILL)",
    "print('PASSED'); print('sandbox: passed'); import os; os._exit(0)",
    "import threading, os; threading.Thread(target=lambda: os._exit(0)).start(); import time; time.sleep(5)",
])
def test_wrong_completion_that_leaves_early_fails(problems, exit_line):
    """A wrong completion ending the process with status 0 (or a fake marker) before the tests run."""
    completion = f"    {exit_line}\n    return None\n"
    prog = humaneval_program(problems[0], completion)
    r = run_python(prog, audit_hook=False)
    assert not r.passed and r.status == "failed", r
    if r.returncode == 0:
        assert "completion token" in r.detail
    ok = run_python(humaneval_program(problems[0], problems[0]["canonical_solution"]), audit_hook=False)
    assert ok.passed  # the same problem with a right completion still passes


def test_exit_zero_at_top_level_after_definitions_fails(problems):
    """Module-level exit between the function and its tests (the asserts never run)."""
    prog = humaneval_program(problems[0], "    return None\nimport os\nos._exit(0)\n")
    assert run_python(prog).status == "failed"


# ----------------------------------------------------------------------------- resources


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


def test_fork_bomb_is_bounded_and_children_die_with_the_run(isolated):
    code = ("import os, time\nn = 0\ntry:\n    for _ in range(300):\n        if os.fork() == 0:\n"
            "            time.sleep(60)\n            os._exit(0)\n        n += 1\nexcept OSError as e:\n"
            "    print('stopped', n, e.errno)\n")
    t0 = time.perf_counter()
    r = run_python(code, timeout=20, audit_hook=False)
    assert r.passed, r.stderr
    words = r.stdout.split()
    assert words[0] == "stopped" and int(words[1]) < S.NPROC and words[2] == "11", r.stdout  # EAGAIN at RLIMIT_NPROC
    assert time.perf_counter() - t0 < 15  # the sleeping children did not keep the run alive


def test_disk_use_is_bounded(isolated):
    code = ("import os\ntotal = 0\ntry:\n    for i in range(100):\n        with open(f'f{i}', 'wb') as f:\n"
            "            for _ in range(8):\n                f.write(b'x' * (1 << 20))\n"
            "                total += 1\nexcept OSError as e:\n    print('stopped', total, e.errno)\n")
    r = run_python(code, timeout=20, file_mb=4, audit_hook=False)
    words = r.stdout.split()
    # each file stops at RLIMIT_FSIZE (SIGXFSZ ignored by Python: EFBIG) or the tmpfs fills up (ENOSPC)
    assert r.status in ("passed", "failed") and words[:1] == ["stopped"], r.stdout + r.stderr
    assert int(words[1]) <= 64 + 1


# ----------------------------------------------------------------------------- no isolation: refuse unless asked


def test_refuses_without_isolation_unless_allowed(monkeypatch):
    monkeypatch.setattr(S, "isolation", lambda: "none")
    monkeypatch.delenv(S.ALLOW_ENV, raising=False)
    with pytest.raises(LlamalabError, match="LLAMALAB_ALLOW_UNSANDBOXED=1") as e:
        run_python("print('ran')")
    assert "--allow-unsandboxed" in str(e.value)
    r = run_python("print('ran')", allow_unsandboxed=True)
    assert r.passed and r.isolation == "none" and r.stdout.strip() == "ran"
    monkeypatch.setenv(S.ALLOW_ENV, "1")
    r = run_python("import os\nos._exit(0)")
    assert r.status == "failed" and r.isolation == "none"  # the token still decides, even unsandboxed


def test_probe_finds_no_isolation_without_unshare(monkeypatch):
    monkeypatch.setattr(S.shutil, "which", lambda name: None)
    monkeypatch.delenv(S.ALLOW_ENV, raising=False)
    S.isolation.cache_clear()
    try:
        assert S.isolation() == "none"
        with pytest.raises(LlamalabError, match="unshare"):
            S.require_isolation()
    finally:
        S.isolation.cache_clear()
        S._probe_errors.clear()


def test_eval_run_refuses_humaneval_before_generating_unless_allowed(monkeypatch, eval_model_folder, tmp_path, capsys):
    from llamalab.cli import main as cli_main
    from llamalab.eval import generative as G

    monkeypatch.setattr(S, "isolation", lambda: "none")
    monkeypatch.delenv(S.ALLOW_ENV, raising=False)
    calls = []
    real = G.run_generation
    monkeypatch.setattr(G, "run_generation", lambda *a, **k: calls.append(1) or real(*a, **k))
    args = ["eval", "run", str(eval_model_folder), "--task", "humaneval", "--path",
            str(shared_path("eval/HumanEval.jsonl.gz")), "--limit", "2", "--max-new-tokens", "4",
            "--output", str(tmp_path / "res")]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert "refusing to run untrusted code" in err and "--allow-unsandboxed" in err and "Traceback" not in err
    assert calls == []  # refused before any decoding
    assert cli_main([*args, "--allow-unsandboxed"]) == 0
    res = json.loads((tmp_path / "res" / "humaneval.json").read_text())
    assert calls and res["options"]["allow_unsandboxed"] is True
    assert [it["sandbox"] for it in res["items"]] == ["none", "none"]


def test_score_humaneval_counts_only_runs_that_reach_the_end(isolated, problems):
    from llamalab.eval.generative import score_humaneval

    p = problems[:2]
    comps = [[p[0]["canonical_solution"], "    import os\n    os._exit(0)\n", "    import sys\n    sys.exit(0)\n"],
             [p[1]["canonical_solution"], "    return None\n", "    print('passed')\n    raise SystemExit(0)\n"]]
    metrics, recs = score_humaneval(p, comps, ks=(1,), workers=2)
    assert [r["correct"] for r in recs] == [1, 1] and metrics["pass@1"] == pytest.approx(1 / 3)
    assert recs[0]["sandbox"] == S.isolation() != "none"
    assert [x["status"] for x in recs[0]["results"]] == ["passed", "failed", "failed"]
    assert "completion token" in recs[0]["results"][1]["detail"]


def test_syntax_error_and_bad_characters_are_plain_failures():
    for code in ("def f(:\n    pass\n", "x = 1 \ufffd 2\n", "\x00", "x = '\ud800'\nprint(x)\n"):
        r = run_python(code)
        assert r.status == "failed" and "Error" in r.stderr.splitlines()[-1], (code, r)  # not a sandbox error


def _sandbox_pids() -> set:
    pids = set()
    for p in os.listdir("/proc"):
        try:
            if p.isdigit() and b"sandbox_child.py" in Path(f"/proc/{p}/cmdline").read_bytes():
                pids.add(int(p))
        except OSError:
            pass
    return pids


def test_the_run_ends_on_its_own_when_the_caller_dies(isolated):
    script = (LIGHT_IMPORT + "from llamalab.eval.sandbox import isolation, run_python\n"
              "isolation()\nprint('probed', flush=True)\nrun_python('import time\\ntime.sleep(120)', timeout=1.0)")
    caller = subprocess.Popen([sys.executable, "-c", script],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert caller.stdout.readline().strip() == "probed"  # the probe's own sandbox has come and gone
    before = _sandbox_pids()
    deadline = time.time() + 20
    while not (_sandbox_pids() - before) and time.time() < deadline:
        time.sleep(0.05)
    started = _sandbox_pids() - before
    assert started, "the sandbox never started"
    left = {json.loads(Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")[-2])["dir"] for p in started}
    caller.kill()  # SIGKILL: no cleanup in the caller
    caller.wait()
    caller.stdout.close()
    time.sleep(1.0)
    assert _sandbox_pids() & started  # still there: only the caller's timeout (1 s) has passed
    while (_sandbox_pids() & started) and time.time() < deadline:
        time.sleep(0.2)
    assert not (_sandbox_pids() & started), "the sandbox outlived its caller"
    for d in left:  # the dead caller could not remove its temp dir
        import shutil

        shutil.rmtree(d, ignore_errors=True)


def test_endless_output_is_bounded():
    """Output goes to files under RLIMIT_FSIZE: a program printing forever cannot fill the caller's memory."""
    r = run_python("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)", timeout=5, file_mb=2, max_output=1000)
    assert not r.passed and r.status in ("failed", "timeout")
    assert r.stdout.startswith("x" * 1000) and r.stdout.endswith("[truncated]")


def test_a_sandbox_that_dies_without_a_status_is_an_error_not_a_pass(monkeypatch, tmp_path, problems, capsys):
    """Stands in for a supervisor killed from outside (OOM killer, an admin): no status line, no token."""
    from llamalab.eval.generative import score_humaneval

    dying = tmp_path / "dying_child.py"
    dying.write_text("import sys\nprint('supervisor gone', file=sys.stderr)\nsys.exit(0)\n")
    monkeypatch.setattr(S, "CHILD", str(dying))
    r = run_python("print('hi')")
    assert r.status == "error" and not r.passed and "supervisor gone" in r.detail
    metrics, recs = score_humaneval(problems[:1], [[problems[0]["canonical_solution"]]], ks=(1,))
    assert metrics["pass@1"] == 0.0 and recs[0]["results"][0]["status"] == "error"
    assert "1 of 1 program(s) ended without a status from the sandbox" in capsys.readouterr().out
