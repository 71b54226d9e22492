"""The inside of the code sandbox: run as ``python -I -B sandbox_child.py JSON`` by :mod:`llamalab.eval.sandbox`.

Started by ``unshare`` in fresh mount, PID, network, IPC and UTS namespaces (and a user namespace
when not run by root), this process is PID 1 of its PID namespace: the supervisor. It

1. reads the program from the run's host temp dir ``dir``;
2. builds a new root: ``/`` bind-mounted recursively and made read-only (and nosuid), ``/home``,
   ``/root``, ``/run``, ``/mnt`` ... hidden behind empty read-only tmpfs (the interpreter's own
   folders bound back), a fresh ``/proc`` of the new PID namespace (no other process is visible),
   an empty ``/dev/pts``, and a private writable tmpfs ``/tmp`` (the program's cwd, HOME and
   TMPDIR; size-limited) and ``/dev/shm``; then ``pivot_root`` into it and detaches the old root;
3. forks the program's process (PID 2), which starts a new session, drops to an unprivileged uid
   (``nobody`` when the supervisor is real root; otherwise a nested user namespace mapping the
   caller to ``nobody``), empties its capability sets, sets ``no_new_privs``, sets its rlimits,
   installs the audit hook (defence in depth only) and runs the program;
4. reports the child's exit status on ``stat_fd`` (a descriptor the program never holds) and exits,
   which kills everything left in the PID namespace.

Pass/fail: only after the program (prompt, completion, asserts, ``check(...)``) returned normally
does the child read the per-run token from ``tok_fd`` and write it to ``res_fd``. An early
``os._exit(0)``, ``sys.exit(0)``, a signal or a printed fake marker leaves no token.

With ``mode == "none"`` (opt-in only) steps 2 and the privilege drop are skipped: rlimits, the
audit hook and the token remain, and the host temp dir is the working directory.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import resource
import signal
import sys

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
AT_FDCWD, AT_RECURSIVE = -100, 0x8000
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID = 1, 2
SYS_MOUNT_SETATTR = 442  # the same on every architecture (new syscalls share one table)
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "arm64": 41, "riscv64": 41, "ppc64le": 203, "ppc64": 203,
                  "s390x": 217, "armv7l": 218, "i686": 217, "i386": 217}
CLONE_NEWUSER = 0x10000000
PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 24, 38
NOBODY = 65534
HIDE = ("/home", "/root", "/run", "/var/run", "/var/tmp", "/mnt", "/media", "/srv", "/dev/pts")

_libc = None


def libc():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(src: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = (lambda s: None if s is None else s.encode())
    check(libc().mount(enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
          f"mount {src or fstype or ''} on {target}")


def make_readonly_tree(root: str, use_setattr: bool = True) -> None:
    """Every mount at or under ``root`` read-only and nosuid (mount_setattr, else one remount each)."""
    if use_setattr:
        attr = (ctypes.c_uint64 * 4)(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID, 0, 0, 0)
        lib = libc()
        lib.syscall.restype = ctypes.c_long
        if lib.syscall(ctypes.c_long(SYS_MOUNT_SETATTR), ctypes.c_int(AT_FDCWD), root.encode(),
                       ctypes.c_uint(AT_RECURSIVE), ctypes.byref(attr), ctypes.c_size_t(32)) == 0:
            return
        if ctypes.get_errno() not in (errno.ENOSYS, errno.EPERM):
            check(-1, f"mount_setattr {root}")
    keep = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": 1024, "nodiratime": 2048,
            "relatime": 1 << 21}
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        rows = [line.split() for line in f]
    for row in rows:  # parents come before their children in mountinfo
        point = row[4].encode().decode("unicode_escape").encode("latin-1").decode("utf-8", "replace")
        if point == root or point.startswith(root.rstrip("/") + "/"):
            flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID
            for opt in row[5].split(","):
                flags |= keep.get(opt, 0)
            try:
                mount(None, point, None, flags)
            except OSError:
                if not os.path.exists(point):
                    continue  # overmounted or gone
                raise


def build_root(new: str, keep: list[str], tmp_mb: int, shm_mb: int, use_setattr: bool = True) -> None:
    """The sandbox's file system view at ``new`` (see the module docstring), then pivot into it."""
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    mount("/", new, None, MS_BIND | MS_REC)
    for h in HIDE:
        if _is_dir(new + h):
            mount("tmpfs", new + h, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
            _bind_back(new, h, keep)  # made read-only with the rest just below
    make_readonly_tree(new, use_setattr)
    try:
        check(libc().umount2((new + "/proc").encode(), MNT_DETACH), "umount old /proc")
    except OSError:
        pass  # locked under a user namespace: the fresh /proc below covers it
    mount("proc", new + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    for h, size, noexec in (("/tmp", tmp_mb, 0), ("/dev/shm", shm_mb, MS_NOEXEC)):  # private and writable
        if _is_dir(new + h):
            mount("tmpfs", new + h, "tmpfs", MS_NOSUID | MS_NODEV | noexec, f"size={size}m,mode=1777")
            for k in _bind_back(new, h, keep):  # an interpreter living under /tmp stays usable, read-only
                make_readonly_tree(new + k, use_setattr)
    machine = os.uname().machine
    nr = SYS_PIVOT_ROOT.get(machine)
    if nr is None:
        raise OSError(f"pivot_root: unknown syscall number on {machine}")
    os.chdir(new)
    lib = libc()
    lib.syscall.restype = ctypes.c_long
    check(lib.syscall(ctypes.c_long(nr), b".", b"."), "pivot_root")
    check(lib.umount2(b".", MNT_DETACH), "detach old root")
    os.chdir("/")


def _is_dir(path: str) -> bool:
    return os.path.isdir(path) and not os.path.islink(path)


def _bind_back(new: str, hidden: str, keep: list[str]) -> list[str]:
    """Bind the interpreter's folders that live under ``hidden`` back into the new root."""
    done = []
    for k in keep:
        if k.startswith(hidden + "/"):
            os.makedirs(new + k, mode=0o755, exist_ok=True)
            mount(k, new + k, None, MS_BIND | MS_REC)
            done.append(k)
    return done


def drop_privileges(mode: str) -> None:
    """To an unprivileged uid with no capabilities and no way back (no_new_privs)."""
    lib = libc()
    if mode == "userns":  # we are root of a user namespace that maps the caller: nest one that maps it to nobody
        check(lib.unshare(CLONE_NEWUSER), "unshare user namespace")
        for name, text in (("setgroups", "deny"), ("uid_map", f"{NOBODY} 0 1"), ("gid_map", f"{NOBODY} 0 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    for cap in range(64):  # the bounding set: no capability can come back through execve
        if lib.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            break
    if mode == "root":
        os.setgroups([])
        os.setresgid(NOBODY, NOBODY, NOBODY)
        os.setresuid(NOBODY, NOBODY, NOBODY)
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)
    data = (ctypes.c_uint32 * 6)()
    check(lib.capset(ctypes.byref(header), ctypes.byref(data)), "capset")
    check(lib.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    if os.getuid() == 0 or os.geteuid() == 0:
        raise OSError("still uid 0 after dropping privileges")


def set_limits(cfg: dict) -> None:
    mem, cpu, fsize = cfg["memory_mb"], cfg["cpu_s"], cfg["file_mb"]
    if mem > 0:
        _lower(resource.RLIMIT_AS, mem << 20)
    _lower(resource.RLIMIT_CPU, cpu, cpu + 1)  # SIGXCPU at the soft limit, SIGKILL a second later
    _lower(resource.RLIMIT_FSIZE, fsize << 20)
    _lower(resource.RLIMIT_CORE, 0)
    _lower(resource.RLIMIT_NOFILE, 256)
    if cfg["mode"] != "none":
        _lower(resource.RLIMIT_NPROC, cfg["nproc"])


def _lower(which: int, soft: int, hard: int | None = None) -> None:
    """Set a limit, never above the hard limit this process already has (raising it would fail)."""
    cur = resource.getrlimit(which)[1]
    hard = soft if hard is None else hard
    if cur != resource.RLIM_INFINITY:
        soft, hard = min(soft, cur), min(hard, cur)
    resource.setrlimit(which, (soft, hard))


def install_audit_hook(tmp: str, violation_exit: int) -> None:
    """Defence in depth (the namespaces are the boundary): refuse writes outside ``tmp``, processes,
    sockets, signals and ctypes. Its state lives in this closure, not in a module the program can import."""
    w_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    # event -> (how many leading path arguments, positions of dir_fd arguments)
    path_events = {"os.remove": (1, (1,)), "os.rmdir": (1, (1,)), "os.mkdir": (1, (2,)), "os.chmod": (1, (2,)),
                   "os.chown": (1, (3,)), "os.truncate": (1, ()), "os.utime": (1, (3,)), "os.rename": (2, (2, 3)),
                   "os.symlink": (2, (2,)), "os.link": (2, (2, 3)), "shutil.rmtree": (1, ()),
                   "shutil.copyfile": (2, ()), "shutil.copytree": (2, ()), "shutil.move": (2, ()),
                   "os.mkfifo": (1, ()), "os.mknod": (1, ()), "os.removexattr": (1, ()), "os.setxattr": (1, ())}
    deny = ("socket.__new__", "socket.connect", "socket.bind", "socket.sendto", "subprocess.Popen",
            "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "pty.spawn",
            "os.kill", "os.killpg", "signal.pthread_kill", "os.startfile", "webbrowser.open", "ctypes.",
            "sys.addaudithook")
    write, exit_, fspath, realpath, sep = os.write, os._exit, os.fspath, os.path.realpath, os.sep

    def outside(p) -> bool:
        if isinstance(p, int):
            return False  # an already open descriptor
        try:
            p = realpath(fspath(p))
        except (TypeError, ValueError):
            return True
        if isinstance(p, bytes):
            p = p.decode("utf-8", "replace")
        return not (p == tmp or p.startswith(tmp + sep))

    def refuse(what: str) -> None:
        write(2, ("sandbox: blocked " + what + "\n").encode("utf-8", "replace"))
        exit_(violation_exit)

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writing = (mode is not None and any(c in str(mode) for c in "wax+")) or (mode is None and flags & w_flags)
            if writing and outside(path):
                refuse("write to %r" % (path,))
        elif event in path_events:
            n, dir_fds = path_events[event]
            if any(i < len(args) and args[i] not in (None, -1, AT_FDCWD) for i in dir_fds):
                refuse("%s relative to a dir_fd" % event)
            for p in args[:n]:
                if outside(p):
                    refuse("%s on %r" % (event, p))
        elif event.startswith(deny):
            refuse(event)

    sys.addaudithook(hook)


def run_child(cfg: dict, source: str) -> None:
    """The program's process: never returns."""
    exit_ = os._exit
    try:
        _child(cfg, source)
    finally:
        exit_(1)


def _child(cfg: dict, source: str) -> None:
    exit_, write, read, close = os._exit, os.write, os.read, os.close
    stat_fd, tok_fd, res_fd = cfg["stat_fd"], cfg["tok_fd"], cfg["res_fd"]
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if cfg["mode"] != "none":
            os.setsid()
            drop_privileges(cfg["mode"])
        set_limits(cfg)
        os.chdir(cfg["workdir"])
        keep_fds = {0, 1, 2, stat_fd, tok_fd, res_fd}
        for fd in os.listdir("/proc/self/fd") if os.path.isdir("/proc/self/fd") else ():
            if int(fd) not in keep_fds:
                try:
                    close(int(fd))
                except OSError:
                    pass
        if cfg["audit"]:
            install_audit_hook(os.path.realpath(cfg["workdir"]), cfg["violation_exit"])
    except BaseException as e:  # the sandbox could not be set up: say so on the supervisor's channel
        write(stat_fd, f"setup-error {type(e).__name__}: {e}\n".encode("utf-8", "replace"))
        exit_(cfg["setup_exit"])
    close(stat_fd)  # the program never holds the supervisor's channel
    del cfg
    try:  # a copy in its working dir gives tracebacks their source lines (the program may change it: no matter)
        if not os.path.exists("program.py"):
            with open("program.py", "w", encoding="utf-8", errors="surrogatepass") as f:
                f.write(source)
    except OSError:
        pass
    try:
        code = compile(source, "program.py", "exec")
        del source
        exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
    except SystemExit as e:  # as the interpreter would: no token, the exit code it asked for
        if isinstance(e.code, int):
            status = e.code
        else:
            status = 0 if e.code is None else 1
            if e.code is not None:
                print(e.code, file=sys.stderr)
        _flush()
        exit_(status & 0xFF)
    except BaseException as e:
        import traceback  # only now: most programs pass, and every import costs start-up time

        traceback.print_exception(type(e), e, e.__traceback__.tb_next)  # from the program's frames on
        _flush()
        exit_(1)
    _flush()
    # The program, its asserts and check(...) returned: only now is the run's token read and written back.
    write(res_fd, read(tok_fd, 256))
    exit_(0)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass


def site_without_pth(site_dirs: list[str]) -> None:
    """What ``site`` gives a program, at a fraction of its start-up cost (we run with ``-S``): the
    site-packages folders on ``sys.path`` (their ``.pth`` hooks are not run) and ``exit``/``quit``."""
    import _sitebuiltins
    import builtins

    sys.path.extend(d for d in site_dirs if d not in sys.path)
    builtins.exit = _sitebuiltins.Quitter("exit", "Ctrl-D (i.e. EOF)")
    builtins.quit = _sitebuiltins.Quitter("quit", "Ctrl-D (i.e. EOF)")


def supervise(cfg: dict) -> None:
    stat = cfg["stat_fd"]
    try:
        site_without_pth(cfg["site_dirs"])
        with open(os.path.join(cfg["dir"], "program.py"), encoding="utf-8", errors="surrogatepass") as f:
            source = f.read()
        if cfg["mode"] != "none":
            build_root(cfg["dir"], cfg["keep"], cfg["tmp_mb"], cfg["shm_mb"], cfg.get("mount_setattr", True))
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # as PID 1 only SIGKILL from outside may end it
        pid = os.fork()
    except BaseException as e:
        os.write(stat, f"setup-error {type(e).__name__}: {e}\n".encode("utf-8", "replace"))
        os._exit(cfg["setup_exit"])
    if pid == 0:
        run_child(cfg, source)
    for fd in (cfg["tok_fd"], cfg["res_fd"]):
        os.close(fd)
    # Should the caller die without killing us, the wall clock still ends the run (and the namespace with it).
    signal.signal(signal.SIGALRM, lambda *_: os._exit(0))
    signal.alarm(cfg["wall_s"])
    while True:  # PID 1 reaps every orphan; the program's process ends the run
        try:
            got, st = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        if got == pid:
            os.write(stat, b"exit %d\n" % os.waitstatus_to_exitcode(st))
            break
    os._exit(0)


if __name__ == "__main__":
    supervise(json.loads(sys.argv[1]))
