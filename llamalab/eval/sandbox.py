"""Run untrusted (model-written) Python under OS isolation: the HumanEval executor.

Each program runs as ``unshare ... python -I -B -S sandbox_child.py`` (:mod:`llamalab.eval.sandbox_child`;
``-S``: site-packages go on ``sys.path`` without running their ``.pth`` hooks, ~30 ms less start-up here):

- **its own namespaces**: mount, PID, network, IPC and UTS (plus a user namespace when not root). The
  PID namespace hides every other process (``/proc`` is fresh: no ``/proc/<parent>/environ``, no
  signal can reach the parent); the network namespace has no interface up (no network at all);
- **a read-only file system**: ``/`` bound read-only and nosuid, ``/home``, ``/root``, ``/run``,
  ``/mnt``, ``/var/tmp``, ``/dev/pts`` ... hidden (the interpreter's folders bound back), and a private
  size-limited tmpfs ``/tmp`` as its only writable place (cwd, HOME, TMPDIR), gone with the run;
- **an unprivileged uid**: ``nobody`` (real root drops to it; otherwise a nested user namespace maps
  the caller to it), no capabilities, ``no_new_privs``, a new session;
- **rlimits**: address space, CPU seconds, file size, processes, open files, no core dumps; a wall
  clock timeout after which the whole namespace is killed; stdout/stderr go to files under the
  file-size limit;
- a minimal environment (``PATH``, ``HOME``, ``TMPDIR``, ``LANG``): nothing of the caller's;
- an audit hook refusing writes outside ``/tmp``, processes, sockets, signals and ctypes (exit 86,
  ``status="blocked"``): defence in depth only, the namespaces are the boundary.

Pass/fail comes from an explicit result, not the exit status: a random per-run token reaches the
program's process through a pipe that is read only after the program (and its asserts) returned,
and is written back on another pipe. ``passed`` needs the token and exit status 0, so a program
that leaves early with ``os._exit(0)``, ``sys.exit(0)`` or a signal, or prints a fake marker, fails.

:func:`isolation` probes once which isolation works here (``root``, ``userns`` or ``none``). With
``none`` (no ``unshare``, or the kernel or a container forbids namespaces) :func:`run_python` refuses
untrusted code unless asked (``allow_unsandboxed=True``, ``--allow-unsandboxed`` on the eval
commands, or ``LLAMALAB_ALLOW_UNSANDBOXED=1``); then only rlimits, the audit hook and the token apply.
Threat model and limits: docs/security.md.
"""

from __future__ import annotations

import json
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from llamalab.common import LlamalabError

VIOLATION_EXIT = 86
SETUP_EXIT = 87
NPROC = 16  # processes per sandbox (root mode: per uid nobody); memory is bounded by NPROC x memory_mb
ALLOW_ENV = "LLAMALAB_ALLOW_UNSANDBOXED"
CHILD = str(Path(__file__).with_name("sandbox_child.py"))
NAMESPACES = ("--mount", "--pid", "--fork", "--kill-child", "--net", "--ipc", "--uts")
_probe_errors: dict[str, str] = {}
_pending: list[subprocess.Popen] = []  # unshare processes whose namespaces are still being torn down
_pending_lock = threading.Lock()


@dataclass
class SandboxResult:
    status: str  # passed | failed | timeout | blocked | error (the sandbox itself ended without a status)
    returncode: int | None  # the program's exit status (-N: killed by signal N; None: no status)
    stdout: str
    stderr: str
    seconds: float
    detail: str = ""  # why it did not pass, when the status alone does not say
    isolation: str = ""  # root | userns | none

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _unshare_prefix(mode: str) -> list[str]:
    exe = shutil.which("unshare") or "/usr/bin/unshare"
    user = ["--user", "--map-root-user"] if mode == "userns" else []
    return [exe, *user, *NAMESPACES, "--"]


def _keep_paths() -> list[str]:
    """The interpreter's folders, bound back into the sandbox when they live under a hidden folder."""
    cands = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, os.path.dirname(sys.executable)}
    real = sorted({os.path.realpath(p) for p in cands} | {os.path.dirname(os.path.realpath(sys.executable))})
    real = [p for p in real if os.path.isdir(p) and p != "/"]
    return [p for p in real if not any(p != q and p.startswith(q + "/") for q in real)]


@lru_cache(maxsize=1)
def _site_dirs() -> list[str]:
    """This interpreter's site-packages (the sandbox runs ``python -S`` and adds them without .pth hooks)."""
    import site

    return [d for d in site.getsitepackages() if os.path.isdir(d)]


def _spawn(code: str, mode: str, timeout: float, memory_mb: int, file_mb: int, max_output: int, audit: bool,
           **extra) -> SandboxResult:
    tmp = tempfile.mkdtemp(prefix="llamalab-sbx-")
    fds: list[int] = []
    try:
        with open(os.path.join(tmp, "program.py"), "wb") as f:
            f.write(code.encode("utf-8", "surrogatepass"))  # a lone surrogate is the program's problem, not ours
        token = secrets.token_hex(16).encode()
        tok_r, tok_w = os.pipe()
        fds += [tok_r, tok_w]
        os.write(tok_w, token)
        res_r, res_w = os.pipe()
        stat_r, stat_w = os.pipe()
        fds += [res_r, res_w, stat_r, stat_w]
        cfg = {"mode": mode, "dir": tmp, "workdir": tmp if mode == "none" else "/tmp", "keep": _keep_paths(),
               "site_dirs": _site_dirs(),
               "memory_mb": memory_mb, "cpu_s": int(timeout) + 1, "file_mb": file_mb, "tmp_mb": max(64, 4 * file_mb),
               "shm_mb": max(1, file_mb), "nproc": NPROC,
               "wall_s": int(timeout) + 2, "tok_fd": tok_r, "res_fd": res_w, "stat_fd": stat_w,
               "audit": audit, "violation_exit": VIOLATION_EXIT, "setup_exit": SETUP_EXIT, **extra}
        home = cfg["workdir"]
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8"}
        cmd = [*(_unshare_prefix(mode) if mode != "none" else ()), sys.executable, "-I", "-B", "-S", CHILD,
               json.dumps(cfg)]
        t0 = time.perf_counter()
        # Output goes to files, not pipes: RLIMIT_FSIZE bounds them (an endless print cannot fill our memory).
        with open(os.path.join(tmp, "stdout"), "wb") as fo, open(os.path.join(tmp, "stderr"), "wb") as fe:
            proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=fo, stderr=fe,
                                    start_new_session=True, pass_fds=(tok_r, res_w, stat_w))
        for fd in (tok_w, tok_r, res_w, stat_w):
            os.close(fd)
            fds.remove(fd)
        raw, timed_out = _wait_status(stat_r, t0 + timeout)
        if timed_out:
            _kill_group(proc)
            proc.wait()
        elif not raw.endswith(b"\n"):  # the supervisor died without a word: wait for unshare's own status
            proc.wait()
        else:  # the status is in; the namespaces' teardown (tens of ms) is not waited for: reaped later
            _reap_later(proc)
        seconds = time.perf_counter() - t0
        out, err = (_head(os.path.join(tmp, name), max_output + 1) for name in ("stdout", "stderr"))
        got, stat = _read_all(res_r), raw.decode("utf-8", "replace").splitlines()
    finally:
        for fd in fds:
            os.close(fd)
        shutil.rmtree(tmp, ignore_errors=True)
    setup = [s[12:] for s in stat if s.startswith("setup-error ")]
    if setup:
        raise LlamalabError(f"code sandbox ({mode}): could not set up the isolation: {setup[0]}"
                            + (f"\n{err.decode('utf-8', 'replace')[-2000:]}" if err else ""))
    codes = [int(s[5:]) for s in stat if s.startswith("exit ")]
    rc = codes[0] if codes else None
    detail = ""
    if timed_out or rc == -signal.SIGXCPU:
        status = "timeout"  # the wall clock, or the CPU limit before it
    elif rc == 0 and secrets.compare_digest(got, token):
        status = "passed"
    elif rc == VIOLATION_EXIT:
        status = "blocked"
    elif rc is None:
        status = "error"
        detail = (f"the sandbox ended without reporting the program's status (exit {proc.poll()}): "
                  + err.decode("utf-8", "replace").strip()[-300:])
    else:
        status = "failed"
        if rc == 0:
            detail = "exit status 0 but the program did not run to its end (no completion token)"
    return SandboxResult(status, rc, _clip(out, max_output), _clip(err, max_output), seconds, detail, mode)


def _reap_later(proc: subprocess.Popen | None = None) -> None:
    """Reap finished ``unshare`` processes left by earlier runs, and keep ``proc`` for a later call."""
    with _pending_lock:
        _pending[:] = [p for p in _pending if p.poll() is None]
        if proc is not None:
            _pending.append(proc)


def _wait_status(fd: int, deadline: float) -> tuple[bytes, bool]:
    """Read the supervisor's status line (``exit N`` or ``setup-error ...``) until ``deadline``;
    returns (what came, timed out). An end of file without a line means the supervisor died."""
    buf = b""
    poller = select.poll()  # not select.select: descriptors above 1024 are common in a big eval process
    poller.register(fd, select.POLLIN)
    while not buf.endswith(b"\n"):
        left = deadline - time.perf_counter()
        if left <= 0 or not poller.poll(max(1, int(left * 1000))):
            if deadline - time.perf_counter() > 0:
                continue
            return buf, True
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buf += chunk
    return buf, False


def _head(path: str, n: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def _read_all(fd: int, limit: int = 4096) -> bytes:
    os.set_blocking(fd, False)
    chunks, n = [], 0
    while n < limit:
        try:
            b = os.read(fd, limit - n)
        except BlockingIOError:
            break
        if not b:
            break
        chunks.append(b)
        n += len(b)
    return b"".join(chunks)


@lru_cache(maxsize=1)
def isolation() -> str:
    """The strongest isolation that works here: ``root`` (namespaces, then uid nobody), ``userns``
    (an unprivileged user namespace) or ``none``. Probed once by running a program that must pass."""
    modes = (["root"] if os.geteuid() == 0 else []) + ["userns"]
    for mode in modes:
        if not shutil.which("unshare"):
            _probe_errors[mode] = "no `unshare` on PATH (Debian/Ubuntu: util-linux)"
            continue
        try:
            r = _spawn("import os\nassert os.getuid() != 0", mode, 20.0, 512, 1, 2000, True)
        except (LlamalabError, OSError) as e:
            _probe_errors[mode] = str(e)
            continue
        if r.passed:
            return mode
        _probe_errors[mode] = f"probe {r.status} (exit {r.returncode}): {r.stderr.strip()[-500:]} {r.detail}"
    return "none"


def allowed_unsandboxed(flag: bool | None = None) -> bool:
    return bool(flag) or os.environ.get(ALLOW_ENV, "") not in ("", "0")


def require_isolation(allow_unsandboxed: bool | None = None) -> str:
    """The isolation mode to run untrusted code with; refuses (``LlamalabError``) when there is none
    and the caller did not opt in."""
    mode = isolation()
    if mode == "none" and not allowed_unsandboxed(allow_unsandboxed):
        why = "; ".join(f"{m}: {e}" for m, e in _probe_errors.items()) or "no namespace support"
        raise LlamalabError(
            "code sandbox: refusing to run untrusted code without OS isolation (Linux namespaces via `unshare` "
            f"are not usable here: {why}). Run where unprivileged user namespaces are allowed "
            "(sysctl kernel.unprivileged_userns_clone=1 / user.max_user_namespaces > 0; in Docker, a seccomp "
            "profile that allows unshare and mount), or accept the risk with --allow-unsandboxed on the eval "
            f"command, allow_unsandboxed=True, or {ALLOW_ENV}=1 (then only rlimits and an audit hook apply)")
    return mode


def _clip(b: bytes, limit: int) -> str:
    s = b[:limit].decode("utf-8", "replace")
    return s + ("\n...[truncated]" if len(b) > limit else "")


def run_python(code: str, timeout: float = 10.0, memory_mb: int = 1024, file_mb: int = 16, max_output: int = 20_000,
               *, allow_unsandboxed: bool | None = None, mode: str | None = None,
               audit_hook: bool = True) -> SandboxResult:
    """Run ``code`` as a program in the sandbox. ``passed`` means it ran to its end (the completion
    token came back) with exit status 0. ``mode`` forces an isolation mode (tests); ``audit_hook=False``
    leaves only the OS isolation (tests that the namespaces hold on their own)."""
    if mode is None:
        mode = require_isolation(allow_unsandboxed)
    elif mode not in ("root", "userns", "none"):
        raise LlamalabError(f"code sandbox: unknown isolation mode {mode!r} (root, userns or none)")
    return _spawn(code, mode, timeout, memory_mb, file_mb, max_output, audit_hook)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()


def humaneval_program(problem: dict, completion: str) -> str:
    """The HumanEval check program: prompt + completion + tests + ``check(entry_point)``."""
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"
