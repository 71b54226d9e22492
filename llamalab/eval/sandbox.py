"""Run untrusted (model-written) Python in a separate, limited process: the HumanEval executor.

Each program runs in a fresh ``python -I -B`` process with:
- a fresh temporary directory as working directory, ``HOME`` and ``TMPDIR`` (deleted afterwards);
- an environment stripped to ``PATH``, ``HOME``, ``TMPDIR`` and ``LANG``;
- resource limits set in the child before the program starts: address space (``RLIMIT_AS``), CPU
  seconds (``RLIMIT_CPU``), size of written files (``RLIMIT_FSIZE``), no core dumps;
- a wall-clock timeout after which the whole process group is killed;
- no network: a fresh network namespace (``unshare -n``, or ``unshare -rn`` unprivileged) where the
  system allows one, and in every case an audit hook (``sys.addaudithook``) that refuses socket
  creation;
- the same audit hook refusing: ``open()`` for writing, and remove/rename/mkdir/chmod/link..., of
  any path outside the temporary directory; starting processes (subprocess, os.system, exec*,
  fork, spawn); signals to other processes; and any use of ctypes. A refused operation ends the
  process at once with exit code 86 (it cannot be caught by the program's ``try``/``except``).

Honest limits: this is a Python-level sandbox, **not a security boundary**. Audit hooks can be
evaded by native code (a C extension already on the path), and reads are not restricted (the
program may read any file the user can). Against a model's accidental ``rm -rf`` or an infinite
loop it is enough; against an adversary, run the evaluation inside a container or VM without
network and with a read-only file system (e.g. ``docker run --network none --read-only``).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache

VIOLATION_EXIT = 86

# Runs in the child: limits, audit hook, then the program. argv: tmpdir, memory MB, cpu s, fsize MB.
RUNNER = r'''
import os, sys, resource
TMP = os.path.realpath(sys.argv[1])
mem, cpu, fsize = (int(a) for a in sys.argv[2:5])
if mem > 0:
    resource.setrlimit(resource.RLIMIT_AS, (mem << 20, mem << 20))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize << 20, fsize << 20))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
with open(os.path.join(TMP, "program.py"), encoding="utf-8") as f:
    SOURCE = f.read()
_W = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_PATH_EVENTS = {"os.remove": 1, "os.rmdir": 1, "os.mkdir": 1, "os.chmod": 1, "os.chown": 1,
                "os.truncate": 1, "os.utime": 1, "os.rename": 2, "os.symlink": 2, "os.link": 2,
                "shutil.rmtree": 1, "shutil.copyfile": 2, "shutil.copytree": 2, "shutil.move": 2,
                "os.mkfifo": 1, "os.mknod": 1, "os.removexattr": 1, "os.setxattr": 1}
_DENY = ("socket.__new__", "socket.connect", "socket.bind", "socket.sendto", "subprocess.Popen",
         "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "pty.spawn",
         "os.kill", "os.killpg", "signal.pthread_kill", "os.startfile", "webbrowser.open")
_write, _exit, _fspath, _realpath = os.write, os._exit, os.fspath, os.path.realpath

def _outside(p):
    if isinstance(p, int):
        return False  # an already open descriptor
    try:
        p = _realpath(_fspath(p))
    except (TypeError, ValueError):
        return True
    if isinstance(p, bytes):
        p = p.decode("utf-8", "replace")
    return not (p == TMP or p.startswith(TMP + os.sep))

def _deny(what):
    _write(2, ("sandbox: blocked " + what + "\n").encode("utf-8", "replace"))
    _exit(%d)

def _hook(event, args):
    if event == "open":
        path, mode, flags = args
        writing = (mode is not None and any(c in str(mode) for c in "wax+")) or (mode is None and flags & _W)
        if writing and _outside(path):
            _deny("write to %%r" %% (path,))
    elif event in _PATH_EVENTS:
        for p in args[:_PATH_EVENTS[event]]:
            if _outside(p):
                _deny("%%s on %%r" %% (event, p))
    elif event.startswith(_DENY) or event.startswith("ctypes."):
        _deny(event)

sys.addaudithook(_hook)
del resource
code = compile(SOURCE, "program.py", "exec")
exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
''' % VIOLATION_EXIT


@dataclass
class SandboxResult:
    status: str  # passed | failed | timeout | blocked
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@lru_cache(maxsize=1)
def netns_prefix() -> tuple[str, ...]:
    """``unshare`` arguments that give the child an empty network namespace here, or () if none works."""
    exe = shutil.which("unshare")
    if not exe:
        return ()
    for args in (("-n",), ("-rn",)):
        try:
            r = subprocess.run([exe, *args, "true"], capture_output=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            continue
        if r.returncode == 0:
            return (exe, *args, "--")
    return ()


def _clip(b: bytes, limit: int) -> str:
    s = b[:limit].decode("utf-8", "replace")
    return s + ("\n...[truncated]" if len(b) > limit else "")


def run_python(code: str, timeout: float = 10.0, memory_mb: int = 1024, file_mb: int = 16,
               network_namespace: bool = True, max_output: int = 20_000) -> SandboxResult:
    """Run ``code`` as a program in the sandbox; ``passed`` means it exited with status 0."""
    tmp = tempfile.mkdtemp(prefix="llamalab-sbx-")
    try:
        with open(os.path.join(tmp, "program.py"), "w", encoding="utf-8") as f:
            f.write(code)
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8"}
        cmd = [*(netns_prefix() if network_namespace else ()), sys.executable, "-I", "-B", "-c", RUNNER,
               tmp, str(memory_mb), str(int(timeout) + 1), str(file_mb)]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
            status = "passed" if proc.returncode == 0 else (
                "blocked" if proc.returncode == VIOLATION_EXIT else "failed")
            if proc.returncode == -signal.SIGXCPU:
                status = "timeout"  # the CPU limit fired before the wall clock
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            out, err = proc.communicate()
            status = "timeout"
        return SandboxResult(status, proc.returncode, _clip(out, max_output), _clip(err, max_output),
                             time.perf_counter() - t0)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()


def humaneval_program(problem: dict, completion: str) -> str:
    """The HumanEval check program: prompt + completion + tests + ``check(entry_point)``."""
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"
