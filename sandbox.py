"""
The sandbox: generated code runs here, and only the values its function returns
come back.

    values = sandbox.run(source, inputs)  # f(xs) for each xs, as plain JSON data; None if the run failed

The caller keeps the expected values to itself and compares (data.code_correct),
so nothing the code prints, patches or returns can read as a pass unless the
values themselves are right.

Each run is a fresh interpreter: this file run as a script, the supervisor. It
reads the job and forks the worker, which builds its sandbox, drops what it may
not keep and only then runs the generated code. Containment comes from the
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
  root, the worker remounts every mount read-only, nosuid, in a mount namespace
  of its own, and mounts a fresh 1 MiB tmpfs owned by it on /tmp: its only
  writable path. The host's mounts are untouched;
- where the machine lets the caller make one (cgroup v1 with the memory, pids
  and cpuacct controllers, or a cgroup v2 ancestor that hands memory and pids
  on): a cgroup of the run's own, which the worker joins before anything else,
  so every process it starts counts towards one total: 1 GiB of memory (swap
  included where the kernel accounts it; past it the kernel kills one of the
  run's processes), PROCESSES processes, and 2 s of CPU, which the supervisor
  checks. When the run ends the supervisor kills what is left in it and removes
  it; the caller removes it if the supervisor could not;
- without that cgroup, the same totals from per-process limits: at most
  PROCESSES processes, each with MEMORY_BYTES / PROCESSES of address space
  (kernel buffers aside), so a single process gets far less than 1 GiB; CPU is
  then 2 s per process, and only the wall clock bounds the run's total;
- always: limits on CPU per process, file size, open files and processes, a
  wall clock enforced by the supervisor, output read by the caller up to
  MAX_OUTPUT bytes, and the run ends when the caller hangs up (a killed
  evaluation leaves nothing running).

The limits are per run: a caller that runs several at once (data.score runs
two) lets them use that many times the memory and CPU.

An audit hook in the worker refuses files opened for writing, processes,
signals, sockets and ctypes. It is a tripwire, not a layer of defence: it runs
in the code's own interpreter, where code that means to can rebind every name
it reads or replace the hook itself, so none of the guarantees here rest on it.
What it does is make honest-but-wrong code (writing a file, shelling out) fail
at once, as a wrong value.

On a machine like this lab's (root, `unshare`, cgroup v1 writable) the uid,
the namespaces, the read-only filesystem and the run's cgroup all hold. What the
sandbox does not guarantee, there or anywhere: the worker can read whatever is
world-readable (the repository, the system's files, and the interpreter's own
directories, which it reaches through handles opened for it: see
_library_through_handles), use the memory, processes and CPU it is given, and
reach world-writable UNIX sockets on the filesystem. Without namespaces (no
`unshare`, or it is refused, as in some containers; a warning says so) the run
falls back to the uid and the limits: as root, everything the uid started is
killed at the end, but world-writable directories (/tmp, /dev/shm) and the
network stay open to it. Not as root, the worker runs as the evaluating user:
with namespaces it has no network and its processes die with the run, but it
can write what that user can write, leave a cgroup that user owns and tamper
with its own supervisor; without them only the limits stand. `guarantees()`
says which of these hold here.
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
PROCESSES = 8  # in the run's cgroup, and per uid (RLIMIT_NPROC): exact for a uid of its own
MAX_OUTPUT = 1 << 16  # bytes of output read back; more fails the run
SETUP_FAILED = 3  # the supervisor's exit status when it could not build the sandbox
UIDS = (0x70000000, 0x7FFFFFFF)  # a range no system assigns (systemd leaves it unused)
UNSHARE = ["--pid", "--fork", "--kill-child", "--net", "--ipc", "--uts", "--mount", "--mount-proc"]


class SandboxError(RuntimeError):
    """The sandbox itself could not be built: not a verdict on the generated code."""


def run(source, inputs, timeout=5.0, audit_hook=True):
    """[f(xs) for xs in inputs] computed by `source`'s f inside the sandbox, as the
    JSON values it returned (None where f raised or returned something JSON cannot
    hold); None if the run failed as a whole (a crash, a limit, malformed or too much
    output). Untrusted data: compare it, never call it. audit_hook=False leaves the
    tripwire out, so tests can check that the kernel's containment holds alone."""
    launcher, mode, with_cgroup = _launcher()
    return _run(launcher, mode, with_cgroup, source, inputs, timeout, audit_hook)


def guarantees():
    """Which of the module docstring's guarantees hold on this machine. Memory and
    processes are bounded per run everywhere (by the run's cgroup or by splitting the
    per-process limits); CPU only with the cgroup. The audit hook is none of them."""
    launcher, mode, with_cgroup = _launcher()
    held = {"own uid": os.geteuid() == 0, "namespaces": mode != "plain", "read-only filesystem": mode == "mounts",
            "memory per run": True, "processes per run": True, "CPU per run": with_cgroup}
    return {name for name, holds in held.items() if holds}


@lru_cache(maxsize=None)
def _launcher():
    """(command prefix, mode, with_cgroup): namespaces where this machine grants them, else
    none, and a cgroup per run where it lets us make one. Each is tried once on a probe
    job, best first; the first that returns the right value is kept."""
    import shutil
    import warnings
    launchers = []
    unshare = shutil.which("unshare")
    if unshare and os.geteuid() == 0:
        launchers.append(([unshare] + UNSHARE, "mounts"))
    elif unshare:
        launchers.append(([unshare, "--user", "--map-current-user"] + UNSHARE, "namespaces"))
    launchers.append(([], "plain"))
    why = "no unshare on PATH"
    for launcher, mode in launchers:
        for with_cgroup in (True, False):
            try:
                if _run(launcher, mode, with_cgroup, "def f(xs):\n    return sum(xs)\n", [[1, 2]], 10.0, True) == [3]:
                    if mode == "plain":
                        warnings.warn(f"sandbox without namespaces ({why}): see sandbox.py for what still holds")
                    return launcher, mode, with_cgroup
                why = f"{mode} sandbox returned a wrong probe value"
            except (SandboxError, OSError) as e:
                why = f"{mode} sandbox: {e}"
    raise SandboxError(why)


def _run(launcher, mode, with_cgroup, source, inputs, timeout, audit_hook):
    import shutil  # here, not at the top: the supervisor runs this file and starts sooner without them
    import subprocess
    import tempfile
    root = os.geteuid() == 0
    uid = UIDS[0] + int.from_bytes(os.urandom(4), "big") % (UIDS[1] - UIDS[0]) if root else os.getuid()
    workdir = None if mode == "mounts" else tempfile.mkdtemp(prefix="sandbox-")  # mounts: a tmpfs inside
    cgroup = _new_cgroup() if with_cgroup else {}
    try:
        if workdir and root:
            os.chown(workdir, uid, uid)
        proc = subprocess.Popen(launcher + [sys.executable, "-I", "-S", os.path.abspath(__file__), mode, str(uid),
                                            str(timeout)], cwd=workdir or "/", env={}, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        with proc:
            try:
                job = {"source": source, "inputs": inputs, "audit_hook": audit_hook, "cgroup": cgroup}
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
                    proc.wait(timeout=10)  # its cleanup gives up after 5 s
                except subprocess.TimeoutExpired:  # never expected: the supervisor is ours
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            if proc.returncode > 0:  # the supervisor's own failure, never the code's
                why = proc.stderr.read(2000).decode(errors="replace").strip()
                raise SandboxError(why or f"the sandbox supervisor exited with status {proc.returncode}")
    finally:
        _remove_cgroup(cgroup)  # already gone, unless the supervisor died before it could remove it
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
# the run's cgroup: made by the caller, joined by the worker, removed by the supervisor


def _new_cgroup():
    """A cgroup for this run alone, its memory, swap and process limits written:
    {controller: directory} under cgroup v1, {"unified": directory} under v2. OSError
    where the machine lets us make none."""
    name = f"sandbox-{os.urandom(8).hex()}"
    with open("/proc/self/cgroup") as f:  # lines "id:controllers:path"; v2's controllers are ""
        ours = {controller: path.strip("/") for _, controllers, path in (line.rstrip("\n").split(":", 2) for line in f)
                for controller in controllers.split(",")}
    if all(controller in ours for controller in ("memory", "pids", "cpuacct")):  # v1: a hierarchy per controller
        cgroup = {c: os.path.join("/sys/fs/cgroup", c, ours[c], name) for c in ("memory", "pids", "cpuacct")}
        limits = {f"{cgroup['memory']}/memory.limit_in_bytes": MEMORY_BYTES, f"{cgroup['pids']}/pids.max": PROCESSES}
        swap = {f"{cgroup['memory']}/memory.memsw.limit_in_bytes": MEMORY_BYTES}  # memory and swap together
    else:  # v2: a cgroup with processes cannot hand controllers on, so ours goes under an ancestor that does
        root = "/sys/fs/cgroup/unified" if os.path.isdir("/sys/fs/cgroup/unified") else "/sys/fs/cgroup"
        parent = ours.get("", "")
        while not {"memory", "pids"} <= set(_read(root, parent, "cgroup.subtree_control").split()):
            if not parent:
                raise OSError("no cgroup hands the memory and pids controllers on")
            parent = os.path.dirname(parent)
        cgroup = {"unified": os.path.join(root, parent, name)}
        limits = {f"{cgroup['unified']}/memory.max": MEMORY_BYTES, f"{cgroup['unified']}/pids.max": PROCESSES}
        swap = {f"{cgroup['unified']}/memory.swap.max": 0}
    try:
        for directory in cgroup.values():
            os.mkdir(directory)
        limits.update({path: value for path, value in swap.items() if os.path.exists(path)})  # where swap is accounted
        for path, value in limits.items():
            with open(path, "w") as f:
                f.write(str(value))
    except OSError:
        _remove_cgroup(cgroup)
        raise
    return cgroup


def _remove_cgroup(cgroup):
    """Kill whatever is still in the run's cgroup and remove it. A cgroup can be removed
    only once empty, a moment after its last process was killed: hence the retries."""
    deadline = time.monotonic() + 5
    for directory in set(cgroup.values()):
        while os.path.isdir(directory) and time.monotonic() < deadline:
            try:
                for pid in _read(directory, "cgroup.procs").split():
                    os.kill(int(pid), signal.SIGKILL)
                os.rmdir(directory)
            except OSError:  # busy until the killed have exited; or one exited before its kill
                time.sleep(0.01)


def _cpu_seconds(cgroup):
    """CPU time all the run's processes have used, from its cgroup's accounting."""
    if "cpuacct" in cgroup:
        return int(_read(cgroup["cpuacct"], "cpuacct.usage")) / 1e9  # v1: nanoseconds
    return int(_read(cgroup["unified"], "cpu.stat").split()[1]) / 1e6  # v2: first line "usage_usec N"


def _read(*path):
    with open(os.path.join(*path)) as f:
        return f.read()


# -----------------------------------------------------------------------------
# inside the sandbox: the supervisor (trusted, keeps its privileges) and the worker


def _supervise(mode, uid, timeout):
    """Fork the worker, and end the run when the worker exits, the caller hangs up,
    time is up or the run's CPU is spent, whichever comes first."""
    libc = ctypes.CDLL(None, use_errno=True)
    job = json.loads(sys.stdin.buffer.readline())
    cgroup = job["cgroup"]
    ready_r, ready_w = os.pipe()
    worker = os.fork()
    if worker == 0:
        os.close(ready_r)
        _work(libc, job, mode, uid, ready_w)
    os.close(ready_w)
    os.close(1)  # only the worker writes results
    ready = os.read(ready_r, 2000)
    if ready != b"ok":  # the worker could not build its sandbox: it never ran the code
        _end(mode, uid, worker, cgroup)
        os.write(2, b"cannot build the sandbox: " + ready)
        os._exit(SETUP_FAILED)
    deadline, worker_exited = time.monotonic() + timeout, os.pidfd_open(worker)
    while (left := deadline - time.monotonic()) > 0:
        # with a cgroup, wake often enough to stop the run soon after its CPU is spent
        if select.select([0, worker_exited], [], [], min(left, 0.05) if cgroup else left)[0]:
            break
        if cgroup and _cpu_seconds(cgroup) > CPU_SECONDS:
            break
    _end(mode, uid, worker, cgroup)
    os._exit(0)


def _end(mode, uid, worker, cgroup):
    """Kill everything the worker started and remove the run's cgroup. In a PID namespace
    the kernel kills what is left when the supervisor, its init, exits; otherwise every
    process of the run's own uid dies."""
    if mode == "plain" and os.geteuid() != 0:
        try:
            os.killpg(worker, signal.SIGKILL)  # its session: all an unprivileged run can reach
        except ProcessLookupError:
            pass
    elif mode == "plain":
        helper = os.fork()
        if helper == 0:
            try:  # kill(-1) as the run's uid: every process of that uid, and only those
                os.setuid(uid)
                if os.getuid() == os.geteuid() == uid != 0:
                    os.kill(-1, signal.SIGKILL)
            finally:
                os._exit(0)
        os.waitpid(helper, 0)
    _remove_cgroup(cgroup)


def _read_only_but_tmp(libc, uid):
    """In a mount namespace of the worker's own: every mount read-only and nosuid (keeping
    its other flags), then a fresh tmpfs on /tmp owned by the worker, its only writable path.
    The worker's own namespace, not the supervisor's: the supervisor must still write the
    cgroup filesystem to remove the run's cgroup."""
    MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, CLONE_NEWNS = 1, 2, 4, 32, 4096, 0x20000
    kept = {"nodev": MS_NODEV, "noexec": 8, "noatime": 1024, "nodiratime": 2048, "relatime": 1 << 21}

    def mount(source, target, fstype, flags, options):
        if libc.mount(source, target.encode(), fstype, flags, options) != 0:
            raise OSError(ctypes.get_errno(), f"mount {target}: {os.strerror(ctypes.get_errno())}")

    if libc.unshare(CLONE_NEWNS) != 0:
        raise OSError(ctypes.get_errno(), f"unshare(CLONE_NEWNS): {os.strerror(ctypes.get_errno())}")
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split()[4:6] for line in f]
    for point, options in mounts:
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | sum(kept.get(o, 0) for o in options.split(","))
        mount(None, re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), point), None, flags, None)  # \040: space
    mount(b"tmpfs", "/tmp", b"tmpfs", MS_NOSUID | MS_NODEV,
          f"size=1m,nr_inodes=64,mode=700,uid={uid},gid={uid}".encode())
    os.chdir("/tmp")


def _library_through_handles():
    """Point imports at the interpreter's library through directory handles opened now,
    while the worker may still read it: /proc/self/fd/N is a magic link, resolved without
    checking the directories above it, so the standard library imports even where one of
    those is closed to the run's uid (Python under /root, mode 0700). Chosen over binding
    the library somewhere readable, which needs a mount namespace: this works in every mode.
    Each handle is one of the worker's OPEN_FILES."""
    if not os.path.isdir("/proc/self/fd"):
        return
    handles = {path: f"/proc/self/fd/{os.open(path, os.O_PATH | os.O_DIRECTORY)}"
               for path in sys.path if os.path.isdir(path)}

    def through_handle(path):
        for directory, handle in handles.items():
            if path == directory or path.startswith(directory + "/"):
                return handle + path[len(directory):]
        return path

    sys.path[:] = map(through_handle, sys.path)
    for module in list(sys.modules.values()):  # packages already imported (encodings, json) keep paths of their own
        if isinstance(getattr(module, "__path__", None), list):
            module.__path__[:] = map(through_handle, module.__path__)
    sys.path_importer_cache.clear()


def _work(libc, job, mode, uid, ready):
    """The worker: build its sandbox and drop privileges, then run the generated code and
    write what f returned for each input, as JSON, to stdout."""
    import io
    try:
        for directory in set(job["cgroup"].values()):  # first: all it starts is counted with it
            with open(os.path.join(directory, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
        if mode == "mounts":
            _read_only_but_tmp(libc, uid)
        os.close(0)
        null = os.open("/dev/null", os.O_WRONLY)
        os.dup2(null, 2)
        os.close(null)
        _library_through_handles()  # after the remount: the handles see the library read-only
        # without a cgroup, PROCESSES processes of this size are the run's whole memory
        memory = MEMORY_BYTES if job["cgroup"] else MEMORY_BYTES // PROCESSES
        for limit, value in [(resource.RLIMIT_CPU, CPU_SECONDS), (resource.RLIMIT_AS, memory),
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


# The audit hook is a tripwire, so it neither hides its lists nor guards itself: code in
# the same interpreter can rebind them, the builtins the hook calls or the hook itself.
_REFUSED_EVENTS = ("os.system", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.exec", "os.kill",
                   "os.killpg", "signal.pidfd_send_signal", "os.remove", "os.unlink", "os.rmdir", "os.rename",
                   "os.truncate", "os.chmod", "os.link", "os.symlink", "os.mkdir", "shutil.rmtree",
                   "subprocess.Popen", "socket.", "ctypes.", "pty.")
_REFUSED_IMPORTS = ("_posixsubprocess", "ctypes", "_ctypes", "subprocess", "socket", "_socket", "pty")
_WRITES = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _refuse(event, args):
    """The audit hook: a tripwire that makes honest code which writes a file, starts a
    process, sends a signal, opens a socket or loads ctypes fail at once, as a wrong value.
    No guarantee rests on it: code that means to can switch it off."""
    if (event.startswith(_REFUSED_EVENTS) or (event == "import" and args[0] in _REFUSED_IMPORTS)
            or (event == "open" and (any(m in str(args[1]) for m in "wax+") or args[2] & _WRITES))):
        raise PermissionError("sandbox: " + event)


if __name__ == "__main__":
    _supervise(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))
