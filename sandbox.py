"""
The sandbox: generated code runs here, and only the values its function returns
come back.

    values = sandbox.run(source, inputs)  # f(xs) for each xs, as plain JSON data; None if the run failed

The caller keeps the expected values to itself and compares (data.code_correct),
so nothing the code prints, patches or returns can read as a pass unless the
values themselves are right.

Each run is a fresh interpreter: this file run as a script, the supervisor. It
reads the job, builds the sandbox, and forks the worker, which drops what it
may not keep and only then runs the generated code. Containment comes from the
kernel, not from the code's cooperation:

- as root (CI and this lab's machines run as root): the worker runs as a uid of
  its own, drawn for this run from a range no system assigns
  (0x70000000-0x7FFFFFFF), with no supplementary groups and no_new_privs, so it
  cannot signal, trace or write anything of another user, setuid binaries do not
  raise it, and the kernel enforces its process count (RLIMIT_NPROC);
- where `unshare` works (root, or user namespaces for others): new PID, network,
  IPC, UTS and mount namespaces. The supervisor is the namespace's init; when it
  exits, for whatever reason, the kernel kills every process the code started,
  setsid or not. The network namespace has only a loopback that is down. As
  root, every mount is remounted read-only, nosuid, in the private mount
  namespace, and /tmp is a fresh 1 MiB tmpfs owned by the worker: its only
  writable path. The host's mounts are untouched;
- always: limits on CPU (2 s), memory (1 GiB), file size, open files and
  processes, a wall clock enforced by the supervisor, output read by the caller
  up to MAX_OUTPUT bytes, and the run ends when the caller hangs up (a killed
  evaluation leaves nothing running). An audit hook refusing files opened for
  writing, processes, sockets and ctypes stays as a second layer only: it lives
  in the code's own interpreter, and the guarantees above do not rest on it.

What it does not guarantee: the worker can read whatever is world-readable (the
repository, the system's files), use the CPU and memory it is given, and reach
world-writable UNIX sockets on the filesystem. Without namespaces (no `unshare`,
or it is refused, as in some containers; a warning says so) the run falls back
to the uid and the limits: as root, everything the uid started is killed at the
end, but world-writable directories (/tmp, /dev/shm) and the network stay open
to it. Not as root, the worker runs as the evaluating user: with namespaces it
has no network and its processes die with the run, but it can write what that
user can write and tamper with its own supervisor; without them only the limits
and the audit hook stand. `guarantees()` says which of these hold here.
"""

import ctypes
import json
import os
import re
import resource
import select
import signal
import sys
import time
from functools import lru_cache

CPU_SECONDS = 2
MEMORY_BYTES = 1 << 30
FILE_BYTES = 1 << 16
OPEN_FILES = 16
PROCESSES = 8  # counted per uid: exact for a uid of its own
MAX_OUTPUT = 1 << 16  # bytes of output read back; more fails the run
SETUP_FAILED = 3  # the supervisor's exit status when it could not build the sandbox
UIDS = (0x70000000, 0x7FFFFFFF)  # a range no system assigns (systemd leaves it unused)
UNSHARE = ["--pid", "--fork", "--kill-child", "--net", "--ipc", "--uts", "--mount", "--mount-proc"]


class SandboxError(RuntimeError):
    """The sandbox itself could not be built: not a verdict on the generated code."""


def run(source, inputs, timeout=5.0, audit_hook=True):
    """[f(xs) for xs in inputs] computed by `source`'s f inside the sandbox, as the
    JSON values it returned (None where f raised or returned something JSON cannot
    hold); None if the run failed as a whole (a crash, the time limit, malformed or
    too much output). Untrusted data: compare it, never call it. audit_hook=False
    leaves the second layer out, so tests can check that the first holds alone."""
    launcher, mode = _launcher()
    return _run(launcher, mode, source, inputs, timeout, audit_hook)


def guarantees():
    """Which of the module docstring's guarantees hold on this machine."""
    launcher, mode = _launcher()
    held = {"own uid": os.geteuid() == 0, "namespaces": mode != "plain", "read-only filesystem": mode == "mounts"}
    return {name for name, holds in held.items() if holds}


@lru_cache(maxsize=None)
def _launcher():
    """(command prefix, mode): namespaces where this machine grants them, else none.
    Each is tried once on a probe job; the first that returns the right value is kept."""
    import shutil
    import warnings
    candidates = []
    unshare = shutil.which("unshare")
    if unshare and os.geteuid() == 0:
        candidates.append(([unshare] + UNSHARE, "mounts"))
    elif unshare:
        candidates.append(([unshare, "--user", "--map-current-user"] + UNSHARE, "namespaces"))
    candidates.append(([], "plain"))
    why = "no unshare on PATH"
    for launcher, mode in candidates:
        try:
            if _run(launcher, mode, "def f(xs):\n    return sum(xs)\n", [[1, 2]], 10.0, True) == [3]:
                if mode == "plain":
                    warnings.warn(f"sandbox without namespaces ({why}): see sandbox.py for what still holds")
                return launcher, mode
            why = f"{mode} sandbox returned a wrong probe value"
        except (SandboxError, OSError) as e:
            why = f"{mode} sandbox: {e}"
    raise SandboxError(why)


def _run(launcher, mode, source, inputs, timeout, audit_hook):
    import shutil  # here, not at the top: the supervisor runs this file and starts sooner without them
    import subprocess
    import tempfile
    root = os.geteuid() == 0
    uid = UIDS[0] + int.from_bytes(os.urandom(4), "big") % (UIDS[1] - UIDS[0]) if root else os.getuid()
    workdir = None if mode == "mounts" else tempfile.mkdtemp(prefix="sandbox-")  # mounts: a tmpfs inside
    try:
        if workdir and root:
            os.chown(workdir, uid, uid)
        proc = subprocess.Popen(launcher + [sys.executable, "-I", "-S", os.path.abspath(__file__), mode, str(uid),
                                            str(timeout)], cwd=workdir or "/", env={}, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        with proc:
            try:
                job = {"source": source, "inputs": inputs, "audit_hook": audit_hook}
                proc.stdin.write(json.dumps(job).encode() + b"\n")
                proc.stdin.flush()
                out = _read_capped(proc.stdout.fileno(), time.monotonic() + timeout + 5)
            except BrokenPipeError:
                out = None
            finally:
                try:
                    proc.stdin.close()  # hang up: the supervisor ends the run and everything in it
                except BrokenPipeError:
                    pass
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:  # never expected: the supervisor is ours
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            if proc.returncode > 0:  # the supervisor's own failure, never the code's
                why = proc.stderr.read(2000).decode(errors="replace").strip()
                raise SandboxError(why or f"the sandbox supervisor exited with status {proc.returncode}")
    finally:
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    try:
        values = json.loads(out) if out is not None else None
    except (ValueError, RecursionError):
        return None
    return values if isinstance(values, list) and len(values) == len(inputs) else None


def _read_capped(fd, deadline):
    """Everything written to fd until it closes, or None past the deadline or MAX_OUTPUT bytes."""
    poll, chunks, size = select.poll(), [], 0
    poll.register(fd, select.POLLIN)
    while size <= MAX_OUTPUT:
        left = deadline - time.monotonic()
        if left <= 0 or not poll.poll(left * 1000):
            return None
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
    return None


# -----------------------------------------------------------------------------
# inside the sandbox: the supervisor (trusted, keeps its privileges) and the worker


def _supervise(mode, uid, timeout):
    """Build the sandbox, fork the worker, and end the run when the worker exits, the
    caller hangs up or time is up, whichever comes first."""
    libc = ctypes.CDLL(None, use_errno=True)
    job = json.loads(sys.stdin.buffer.readline())
    try:
        if mode == "mounts":
            _read_only_but_tmp(libc, uid)
    except OSError as e:
        os.write(2, f"cannot build the sandbox's filesystem: {e}".encode())
        os._exit(SETUP_FAILED)
    ready_r, ready_w = os.pipe()
    worker = os.fork()
    if worker == 0:
        os.close(ready_r)
        _work(libc, job, uid, ready_w)
    os.close(ready_w)
    os.close(1)  # only the worker writes results
    ready = os.read(ready_r, 2000)
    if ready != b"ok":  # the worker could not drop its privileges: it never ran the code
        _end(mode, uid, worker)
        os.write(2, b"cannot start the sandbox's worker: " + ready)
        os._exit(SETUP_FAILED)
    select.select([0, os.pidfd_open(worker)], [], [], timeout)
    _end(mode, uid, worker)
    os._exit(0)


def _end(mode, uid, worker):
    """Kill everything the worker started. In a PID namespace the kernel does it when
    the supervisor, its init, exits; otherwise every process of the run's own uid dies."""
    if mode != "plain":
        return
    if os.geteuid() != 0:
        try:
            os.killpg(worker, signal.SIGKILL)  # its session: all an unprivileged run can reach
        except ProcessLookupError:
            pass
        return
    helper = os.fork()
    if helper == 0:
        try:  # kill(-1) as the run's uid: every process of that uid, and only those
            os.setuid(uid)
            if os.getuid() == os.geteuid() == uid != 0:
                os.kill(-1, signal.SIGKILL)
        finally:
            os._exit(0)
    os.waitpid(helper, 0)


def _read_only_but_tmp(libc, uid):
    """In the private mount namespace: every mount read-only and nosuid (keeping its
    other flags), then a fresh tmpfs on /tmp owned by the worker, its only writable path."""
    MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND = 1, 2, 4, 32, 4096
    kept = {"nodev": MS_NODEV, "noexec": 8, "noatime": 1024, "nodiratime": 2048, "relatime": 1 << 21}

    def mount(source, target, fstype, flags, options):
        if libc.mount(source, target.encode(), fstype, flags, options) != 0:
            raise OSError(ctypes.get_errno(), f"mount {target}: {os.strerror(ctypes.get_errno())}")

    with open("/proc/self/mountinfo") as f:
        mounts = [line.split()[4:6] for line in f]
    for point, options in mounts:
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | sum(kept.get(o, 0) for o in options.split(","))
        mount(None, re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), point), None, flags, None)  # \040: space
    mount(b"tmpfs", "/tmp", b"tmpfs", MS_NOSUID | MS_NODEV,
          f"size=1m,nr_inodes=64,mode=700,uid={uid},gid={uid}".encode())
    os.chdir("/tmp")


def _work(libc, job, uid, ready):
    """The worker: drop privileges, then run the generated code and write what f
    returned for each input, as JSON, to stdout."""
    import io
    try:
        os.close(0)
        null = os.open("/dev/null", os.O_WRONLY)
        os.dup2(null, 2)
        os.close(null)
        for limit, value in [(resource.RLIMIT_CPU, CPU_SECONDS), (resource.RLIMIT_AS, MEMORY_BYTES),
                             (resource.RLIMIT_FSIZE, FILE_BYTES), (resource.RLIMIT_NOFILE, OPEN_FILES),
                             (resource.RLIMIT_NPROC, PROCESSES), (resource.RLIMIT_CORE, 0)]:
            resource.setrlimit(limit, (value, value))
        if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS: setuid binaries cannot raise it
            raise OSError("prctl(PR_SET_NO_NEW_PRIVS) failed")
        if os.geteuid() == 0:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            if 0 in os.getresuid() + os.getresgid():
                raise OSError("still root after setuid")
        os.setsid()
        os.write(ready, b"ok")
    except BaseException as e:
        os.write(ready, repr(e).encode()[:1000])
        os._exit(SETUP_FAILED)
    os.close(ready)
    try:
        if job["audit_hook"]:
            sys.addaudithook(_refuse)
        sys.stdout = sys.stderr = io.StringIO()  # print() goes nowhere; only the values below are written
        values = "null"
        try:
            scope = {}
            exec(compile(job["source"], "<generated>", "exec"), scope)
            returned = []
            for xs in job["inputs"]:
                try:
                    returned.append(json.dumps(scope["f"](list(xs))))
                except BaseException:
                    returned.append("null")
            values = "[" + ",".join(returned) + "]"
        except BaseException:
            pass
        out = values.encode()
        while out:
            out = out[os.write(1, out):]
    finally:
        os._exit(0)  # never back into the supervisor's code


_WRITES = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _refuse(event, args, refused_events=("os.system", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn",
                                         "os.exec", "os.kill", "os.killpg", "signal.pidfd_send_signal",
                                         "os.remove", "os.unlink", "os.rmdir", "os.rename", "os.truncate",
                                         "os.chmod", "os.link", "os.symlink", "os.mkdir", "shutil.rmtree",
                                         "subprocess.Popen", "socket.", "ctypes.", "pty.", "gc.get_referrers",
                                         "sys._getframe"),
            refused_imports=("_posixsubprocess", "ctypes", "_ctypes", "subprocess", "socket", "_socket", "pty")):
    """The second layer, an audit hook: refuses writing files, processes, signals, sockets
    and ctypes. Its lists are default arguments, not globals, and it refuses to be edited."""
    if (event.startswith(refused_events) or (event == "import" and args[0] in refused_imports)
            or (event == "open" and (any(m in str(args[1]) for m in "wax+") or args[2] & _WRITES))
            or (event in ("object.__setattr__", "object.__delattr__") and args[0] is _refuse)):
        raise PermissionError("sandbox: " + event)


if __name__ == "__main__":
    _supervise(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))
