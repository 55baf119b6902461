"""The warm worker (#17): the model stages' jobs run in a process that has torch, diffusers,
transformers, peft and mlflow imported already.

Importing those costs a model-stage job 2-10 s of its life, more than most jobs of a small run
spend working. So one server process imports them once, and every job that asks (`delegate`)
is run in a child forked from it: the job's own script, Snakemake's preamble included, executed
from the top in that child, with the job's argv, working directory, environment, umask, standard
streams and sys.path. A job is its own process still; it only skips the imports.

A local Snakemake's ``onstart`` calls `start`: it connects to the server of this interpreter
and import-time environment (one per such key, shared by every workflow folder of this user),
or starts one, and registers itself. A server exits once no registered Snakemake is alive and
no job has run for its idle time (``warm_worker_idle_minutes``; 0: with the last Snakemake).
So a second run right after a first (a changed setting) finds it warm.

What keeps this exact:

- **Code is read fresh.** The server imports third-party libraries only; every ``lorapipe``
  module a job uses is imported in the job's child, from disk (the server's own ``lorapipe`` is
  dropped from the child's ``sys.modules``). A job's code param (``script_code``) therefore
  means what it means in a cold process. This module's own source is in the server's key: a
  changed lorapipe.warm gets a server of its own.
- **Same libraries or no warm start.** The child must resolve each preloaded library from the
  job's own ``sys.path`` to the very file the server loaded, run the same interpreter, and see
  the same import-time environment (``HF_*``, ``TORCH*``, ``PYTHON*`` ...: `IMPORT_ENV`);
  otherwise the server refuses and the job runs cold, as before. A preloaded library whose files
  changed on disk since (an upgrade) retires the server: it refuses every job from then on and
  exits when its children have, and the next Snakemake starts a fresh one. A job also runs cold
  when it finds no server, a server still importing (unless the job waits:
  ``delegate(wait=True)``), another host's server, or a non-Linux system.
- **Kill anywhere.** The job's own process (the client) stays in Snakemake's process group
  and waits; SIGTERM/SIGINT/SIGHUP are passed on to the child; when the client dies (kill -9 of
  the group) the server sees its connection close and kills the child at once (a watchdog
  thread in the child too, should the server be gone). The client learns the status only once
  the child is reaped.
- **Exit status and diagnostics** are the job's: the client exits with the child's status (or
  dies of its signal); tracebacks go to the job's own stderr, logs to its log file; a refusal
  is one line on the job's stderr, with the reason.

Transport: a Unix socket in a 0700 folder of this user's (``$XDG_RUNTIME_DIR`` or ``/tmp``),
peer credentials checked; a request is JSON, with the job's three standard streams passed as
file descriptors (SCM_RIGHTS). No pickle crosses it. The server's log (what it preloaded and how
long it took, each job served or refused and why) is ``<socket>.log`` beside it; a workflow's
``logs/warm_worker.log`` names it. ``python -m lorapipe.warm stop`` stops this user's servers.
Stdlib only at import: the Snakefile imports this module while planning.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import struct
import sys
import threading
import time

ENV = "LORAPIPE_WARM"  # "<host>\t<socket path>": set for the jobs by `start`
CHILD_ENV = "LORAPIPE_WARM_CHILD"  # set in a served job's environment: do not delegate again
JOB_START_ENV = "LORAPIPE_JOB_START"  # the client's process start (unix time), for jobtime
# Libraries imported once by the server; what a job imports beyond these it imports itself.
PRELOAD = (
    "snakemake.script",  # the preamble Snakemake puts atop each job's script (0.1 s a job, #17)
    "torch", "numpy", "PIL.Image", "safetensors.torch", "diffusers", "transformers", "peft",
    "peft.utils", "diffusers.optimization", "diffusers.training_utils", "diffusers.utils",
)  # fmt: skip
# Imported after the jobs queued meanwhile are forked (those import them themselves if they
# need them): what the model-loading jobs do not need, ~3 s of the ~10. matplotlib: train's
# loss.png (its import was 0.4 s of a warm train job, #17). A job that comes while one of these
# is imported waits for that one: so mlflow's large dependencies come one by one before it
# (importing mlflow alone was 1.2 s, the longest wait; now no step is much over 0.5 s).
PRELOAD_LATE = ("webdataset", "pandas", "sqlalchemy", "alembic", "fastapi", "mlflow.entities",
                "mlflow", "mlflow.store.tracking.sqlalchemy_store", "sqlalchemy.dialects.sqlite",
                "matplotlib", "matplotlib.pyplot")  # fmt: skip
# diffusers and transformers import their classes lazily: these are what lorapipe uses.
PRELOAD_NAMES = {
    "diffusers": ("UNet2DConditionModel", "AutoencoderKL", "DDPMScheduler",
                  "EulerDiscreteScheduler", "StableDiffusionPipeline",
                  "StableDiffusionXLPipeline"),
    "transformers": ("CLIPTextModel", "CLIPTextModelWithProjection", "CLIPTokenizer",
                     "CLIPTextConfig"),
}  # fmt: skip
# Environment read when those libraries are imported: a job whose values differ from the
# server's runs cold. (Thread counts, OMP_NUM_THREADS and the like, are applied in the child.)
# (mlflow reads its MLFLOW_* settings when called, not at import: a job's own apply.)
IMPORT_ENV = ("PYTHON", "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "DIFFUSERS_", "TORCH", "PYTORCH_",
              "LD_", "MALLOC_", "KMP_", "GOMP_", "TOKENIZERS_", "MPL")  # fmt: skip
FIRST_HELLO_S = 30.0  # a new server waits this long for its first Snakemake in any case
HANDSHAKE_S = 600.0  # a job waits at most this long for a server still importing
_HEADER = struct.Struct("!I")


def supported() -> bool:
    return sys.platform.startswith("linux") and hasattr(os, "pidfd_open")


def socket_dir() -> str:
    """This user's folder for worker sockets, made 0700; refused if anyone else could use it."""
    base = os.environ.get("XDG_RUNTIME_DIR") or "/tmp"
    path = os.path.join(base, f"lorapipe-warm-{os.getuid()}")
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not os.path.isdir(path) or os.path.islink(path) or st.st_uid != os.getuid():
        raise OSError(f"{path}: not a folder of this user's")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def _remove(*paths: str) -> None:
    for p in paths:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


def _import_env(env: dict) -> dict:
    return {k: v for k, v in env.items() if k.startswith(IMPORT_ENV) and k != "PYTHONPATH"}


# --------------------------------------------------------------------------- the workflow side


def server_key(idle_s: float, modules=None) -> str:
    """What a server is shared by: this interpreter, its import-time environment, this module's
    source, the idle time and the preloaded modules."""
    import hashlib

    with open(__file__, "rb") as f:
        me = hashlib.sha256(f.read()).hexdigest()
    ident = [os.path.realpath(sys.executable), sorted(_import_env(os.environ).items()), me,
             idle_s, list(modules) if modules is not None else None]  # fmt: skip
    return hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:16]


def start(log_path: str, idle_s: float = 600.0, modules=None) -> str | None:
    """Connect this process (Snakemake's main one) to its warm worker, starting one if none
    runs, and tell its jobs where it is (the ``LORAPIPE_WARM`` environment variable). Returns
    the socket path, or None where warm workers are not supported. ``log_path`` gets a line
    naming the server and its log. ``modules``: what it imports, when not `PRELOAD` (tests)."""
    if not supported():
        return None
    early = _early.pop((idle_s, modules), None)
    if early is not None:
        early.join()
    path = _server_path(idle_s, modules)
    started = early is not None and early.proc is not None
    for _attempt in range(2):  # twice: a server may exit idle between our probe and hello
        started = _ensure_server(path, idle_s, modules) or started
        if _send(path, {"kind": "hello", "pid": os.getpid()}):
            break
    os.environ[ENV] = f"{socket.gethostname()}\t{path}"
    os.makedirs(os.path.dirname(os.path.abspath(log_path)) or ".", exist_ok=True)
    with open(log_path, "w") as f:
        how = "started now" if started else "already running"
        f.write(f"warm worker {path} ({how}); its log: {path}.log\n")
    return path


def start_early(idle_s: float = 600.0, modules=None) -> bool:
    """Start the server `start` will join, now, without waiting for it: called while Snakemake
    still parses the Snakefile and plans (~0.5-1 s of a fresh run, #17), so the server imports
    meanwhile. The socket is checked and the server spawned in a thread; `start` (Snakemake's
    ``onstart``) waits for that thread, then says hello as always. If this process exits
    without `start` (the run stopped before ``onstart``), `_release_unused` tells the server it
    spawned. Whether a thread was begun."""
    if not supported() or (idle_s, modules) in _early:
        return False
    path = _server_path(idle_s, modules)

    def ensure():
        try:
            if _ensure_server(path, idle_s, modules):
                thread.proc = _started[-1]  # the server this thread spawned
        except OSError:
            pass  # `start` tries again, and says why if it cannot

    thread = threading.Thread(target=ensure, name="lorapipe-warm-start", daemon=True)
    thread.proc = None
    _early[(idle_s, modules)] = thread
    thread.start()
    if len(_early) == 1:
        import atexit

        atexit.register(_release_unused)
    return True


_early: dict = {}  # (idle_s, modules) -> the thread of `start_early`, until `start` takes it
UNNEEDED = signal.SIGUSR1  # to a server `start_early` spawned: "I have nothing to run"


def _release_unused() -> None:
    """At exit of a Snakemake that started a server early and never got to `start` (nothing to
    do, or an error while planning): tell the server, which exits unless someone else has come
    to it meanwhile, instead of importing for nobody and waiting FIRST_HELLO_S."""
    for thread in list(_early.values()):
        thread.join(timeout=10)
        if thread.proc is not None and thread.proc.poll() is None:
            try:
                os.kill(thread.proc.pid, UNNEEDED)
            except ProcessLookupError:
                pass
    _early.clear()


def _server_path(idle_s: float, modules) -> str:
    return os.path.join(socket_dir(), f"{server_key(idle_s, modules)}.sock")


def _ensure_server(path: str, idle_s: float, modules) -> bool:
    """Spawn the server at ``path`` unless one answers there (under the key's lock, so that two
    Snakemakes starting together start one); whether this call spawned it."""
    import fcntl

    with open(path.removesuffix(".sock") + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _alive(path):
            return False
        _prune(os.path.dirname(path))
        _spawn(path, idle_s, modules)
        return True


STALE_DAYS = 7.0


def _prune(folder: str, days: float = STALE_DAYS) -> int:
    """Remove the logs and lock files of servers no longer running that nothing has touched for
    ``days`` (each key, a ``warm.py`` source or import environment, leaves its own; a server's
    log stays while it runs and for a week after, to read). How many files were removed."""
    removed, cutoff = 0, time.time() - days * 86400
    try:
        names = os.listdir(folder)
    except OSError:
        return 0
    for name in names:
        key, _, ext = name.partition(".")
        if ext not in ("lock", "sock.log") or os.path.exists(os.path.join(folder, key + ".sock")):
            continue
        p = os.path.join(folder, name)
        try:
            if os.stat(p).st_mtime < cutoff:
                os.unlink(p)
                removed += 1
        except OSError:
            pass
    return removed


def _spawn(path: str, idle_s: float, modules) -> None:
    """Start a server at ``path``; return once it listens (it imports after that)."""
    import subprocess

    _remove(path, path + ".ready")
    with open(path + ".log", "a") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lorapipe.warm", "serve", path, repr(idle_s)]
            + ([",".join(modules)] if modules is not None else []),
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, close_fds=True,
        )  # fmt: skip
    _started.append(proc)  # never waited on: it outlives us by design
    deadline = time.monotonic() + 10
    while not os.path.exists(path) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)


def stop(idle_s: float = 600.0, modules=None) -> bool:
    """Ask the server `start` would use from this environment to stop (it exits when its jobs
    have); whether one was there to ask."""
    if not supported():
        return False
    return _send(os.path.join(socket_dir(), f"{server_key(idle_s, modules)}.sock"),
                 {"kind": "stop"})  # fmt: skip


def stop_all() -> list[str]:
    """Ask every warm worker of this user's to stop (each exits when its jobs have); the
    sockets asked."""
    if not supported():
        return []
    folder = socket_dir()
    asked = []
    for name in sorted(os.listdir(folder)):
        if name.endswith(".sock") and _send(os.path.join(folder, name), {"kind": "stop"}):
            asked.append(os.path.join(folder, name))
    return asked


def _alive(path: str) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(2)
            s.connect(path)
        return True
    except OSError:
        return False


def _send(path: str, msg: dict) -> bool:
    """One message to a server, not waiting for it to be read (it may be importing still)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(2)
            s.connect(path)
            body = json.dumps(msg).encode()
            s.sendall(_HEADER.pack(len(body)) + body)
        return True
    except OSError:
        return False


_started: list = []


# --------------------------------------------------------------------------- the job side


def delegate(wait: bool = False, late: bool = False) -> None:
    """Run this job in the workflow's warm worker when it serves it: then this process exits
    here with the job's status. Returns (the job runs here, cold) when there is no worker, it
    refuses the job, or it is still importing and ``wait`` is false. ``late``: the job needs
    the late stage's modules (`PRELOAD_LATE`), so a worker still importing them forks it once
    they are in, instead of letting it import them itself beside the worker (#17: a fresh
    run's train job spent 2.5 s doing so). Call it first thing."""
    if os.environ.get(CHILD_ENV) or not supported():
        return
    where = os.environ.get(ENV, "")
    host, _, path = where.partition("\t")
    if not path or host != socket.gethostname() or not os.path.exists(path):
        return
    if not wait and not os.path.exists(path + ".ready"):
        return
    try:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.settimeout(HANDSHAKE_S)
        conn.connect(path)
        _send_request(conn, late)
        replies = _replies(conn)
        reply = next(replies, None)
    except OSError:
        return
    if not reply or "pid" not in reply:
        if reply and reply.get("refused"):
            print(f"lorapipe: the warm worker did not take this job ({reply['refused']}); "
                  "running it here", file=sys.stderr, flush=True)  # fmt: skip
        return  # refused, or the worker is gone: run cold
    conn.settimeout(None)
    _wait_for(replies, reply["pid"])


def _send_request(conn: socket.socket, late: bool = False) -> None:
    from lorapipe import jobtime

    started = jobtime.process_start()
    body = json.dumps({
        "kind": "job", "argv": sys.argv, "cwd": os.getcwd(), "env": dict(os.environ),
        "umask": _umask(), "sys_path": sys.path, "executable": os.path.realpath(sys.executable),
        "started": started if started is not None else time.time(), "late": late,
    }).encode()  # fmt: skip
    data = _HEADER.pack(len(body)) + body
    socket.send_fds(conn, [data[:4096]], [0, 1, 2])
    if len(data) > 4096:
        conn.sendall(data[4096:])


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _replies(conn: socket.socket):
    """The server's messages on ``conn``, one JSON line each, until it closes. (The child's
    pid and its status can arrive in one read when the job is quick.)"""
    buf = b""
    while True:
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            yield json.loads(line)
        try:
            chunk = conn.recv(4096)
        except InterruptedError:
            continue
        if not chunk:
            return
        buf += chunk


def _wait_for(replies, pid: int) -> None:
    """Wait for the child's status, passing on the signals a job is stopped with; then leave
    this process as the child left."""

    def forward(signum, frame):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, forward)
    status = next((m for m in replies if "exit" in m or "signal" in m), None)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    if status is None:
        os.write(2, f"lorapipe: the warm worker's job (pid {pid}) ended with no status\n".encode())
        os._exit(1)
    if "signal" in status:
        signal.signal(status["signal"], signal.SIG_DFL)
        os.kill(os.getpid(), status["signal"])
        os._exit(128 + status["signal"])
    os._exit(status["exit"])


# --------------------------------------------------------------------------- the server


def _log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)


def preload(modules=PRELOAD, names=PRELOAD_NAMES) -> None:
    import importlib

    for name in modules:
        importlib.import_module(name)
    for module, attrs in names.items():
        mod = sys.modules[module]
        for n in attrs:
            getattr(mod, n)


def refusal(req: dict, modules, env: dict) -> str | None:
    """Why this server must not run the job (None: it may); ``env``: the server's import-time
    environment (`_import_env`), as it was before the server changed its own."""
    import importlib.machinery

    if req.get("executable") != os.path.realpath(sys.executable):
        return f"another interpreter ({req.get('executable')})"
    mine, theirs = env, _import_env(req["env"])
    if mine != theirs:
        keys = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        return f"import-time environment differs: {', '.join(keys)}"
    for name in sorted({m.split(".")[0] for m in modules} & set(sys.modules)):
        loaded = getattr(sys.modules.get(name), "__file__", None)
        spec = importlib.machinery.PathFinder.find_spec(name, req["sys_path"])
        if spec is None or spec.origin != loaded:
            return f"{name} resolves elsewhere on the job's sys.path"
    return None


def serve(path: str, idle_s: float, modules=PRELOAD, names=PRELOAD_NAMES, late=()) -> None:
    """Listen at ``path`` (bound before the imports, so an early job queues instead of failing),
    import, then serve until no registered Snakemake is alive and no job has run for
    ``idle_s`` seconds, or until retired."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        listener.bind(tmp)
        listener.listen(64)
        os.rename(tmp, path)  # the path appears listening: a job never finds it refusing
    except OSError as e:
        _log(f"not serving: {path}: {e}")
        return
    srv = _Server(path, listener, idle_s, (*modules, *late))

    def unneeded(signum, frame):
        # (Runs between two bytecodes of the imports: nothing has been forked or greeted that
        # is not in srv, and a hello or job still queued shows as a pending connection.)
        if srv.children or srv.parents or srv.held or select.select([listener], [], [], 0)[0]:
            _log("the Snakemake that started this worker had nothing to run; another uses it")
            return
        _log("exiting: the Snakemake that started this worker had nothing to run")
        _remove(path, path + ".ready")
        os._exit(0)

    signal.signal(UNNEEDED, unneeded)
    try:
        t = time.perf_counter()
        os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # never initialise CUDA here
        preload(modules, names)
        _log(f"pid {os.getpid()} preloaded {', '.join(modules) or 'nothing'} in "
             f"{time.perf_counter() - t:.2f} s")  # fmt: skip
        srv.importing_late = bool(late)
        for name in late:
            while srv.step(0):  # jobs queued while importing go now (but those held)
                pass
            try:
                preload((name,), {})
            except ImportError as e:  # (a job that needs it imports it, or says why not)
                _log(f"not preloaded: {name}: {e}")
        srv.importing_late = False
        srv.stamps = _stamps(srv.modules)
        why_not = _unforkable()
        if why_not:
            srv.retire(why_not)
        srv.release_held()
        _log(f"preloaded all in {time.perf_counter() - t:.2f} s" + (f"; {why_not}" if why_not
                                                                     else ""))  # fmt: skip
        if not srv.retired:
            open(path + ".ready", "w").close()
        # whoever started it says hello next: wait for that a while, whatever the idle time
        srv.idle_since = time.monotonic() + max(0.0, FIRST_HELLO_S - idle_s)
        srv.loop()
    finally:
        srv.close()


class _Server:
    def __init__(self, path: str, listener: socket.socket, idle_s: float, modules):
        self.path, self.listener, self.idle_s, self.modules = path, listener, idle_s, modules
        self.env = _import_env(os.environ)  # as the jobs will have it, before our changes
        self.children: dict[int, tuple[int, socket.socket]] = {}  # pidfd -> (pid, connection)
        self.parents: dict[int, int] = {}  # pidfd -> pid of a registered Snakemake
        self.clients: dict[int, int] = {}  # connection fd of a job's process -> its child's pidfd
        self.stamps: dict = {}
        self.retired: str | None = None
        self.idle_since = time.monotonic()
        self.importing_late = False
        # jobs that asked for the late modules, come while they were imported: (connection,
        # standard streams, request, client pid), forked once they are in
        self.held: list[tuple] = []

    def release_held(self) -> None:
        for conn, fds, req, client in self.held:
            try:
                conn = self.job(conn, fds, req, client)
            except OSError as e:  # its client is gone: nothing to run it for
                _log(f"bad request: {e}")
            finally:
                _close(conn, fds)
        self.held = []

    def loop(self) -> None:
        while True:
            busy = self.children or (self.parents and not self.retired)
            if not busy:
                if self.retired:
                    _log(f"exiting: {self.retired}")
                    return
                left = self.idle_since + self.idle_s - time.monotonic()
                if left <= 0 and not select.select([self.listener], [], [], 0)[0]:
                    _log(f"exiting: no Snakemake and no job for {self.idle_s:g} s")
                    return  # (a queued hello or job is taken first)
                left = max(left, 0)
            self.step(None if busy else left)

    def step(self, timeout: float | None) -> bool:
        """Wait up to ``timeout`` for events (None: until one), then handle them; whether
        there were any."""
        watch = [*self.children, *self.parents, *self.clients]
        if not self.retired:
            watch.append(self.listener)
        ready, _, _ = select.select(watch, [], [], timeout)
        for fd in ready:
            if fd in self.clients:
                self.client_gone(fd)
        for fd in ready:
            if fd in self.children:
                self.clients.pop(self.children[fd][1].fileno(), None)
                _reap(fd, self.children)
                self.idle_since = time.monotonic()
            elif fd in self.parents:
                os.close(fd)
                _log(f"Snakemake {self.parents.pop(fd)} ended")
                self.idle_since = time.monotonic()
        if self.listener in ready:
            self.accept()
        return bool(ready)

    def client_gone(self, fd: int) -> None:
        """A job's own process closed its connection (killed: it sends nothing after its
        request): kill its child now. From here, not only from the child's watchdog thread,
        which cannot run while the job holds the GIL in a long C call."""
        pidfd = self.clients[fd]
        pid, conn = self.children[pidfd]
        try:
            if conn.recv(4096, socket.MSG_DONTWAIT):
                return  # (nothing is sent; ignore it)
        except BlockingIOError:
            return
        except OSError:
            pass
        del self.clients[fd]
        try:
            os.kill(pid, signal.SIGKILL)
            _log(f"pid {pid}: its job's process is gone: killed")
        except ProcessLookupError:
            pass

    def retire(self, why: str) -> None:
        """Take no more jobs: the socket goes (the next Snakemake starts a fresh server)."""
        if self.retired:
            return
        self.retired = why
        _log(f"retired: {why}")
        self.listener.close()
        _remove(self.path, self.path + ".ready")

    def accept(self) -> None:
        conn, _ = self.listener.accept()
        fds: list[int] = []
        try:
            conn.settimeout(30)
            pid, uid, _gid = struct.unpack("3i", conn.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))  # fmt: skip
            if uid != os.getuid():
                raise OSError(f"peer uid {uid}")
            msg, fds, _flags, _addr = socket.recv_fds(conn, 4096, 3)
            if len(msg) < _HEADER.size:
                return  # a liveness probe (start's _alive)
            (size,) = _HEADER.unpack(msg[: _HEADER.size])
            body = msg[_HEADER.size :]
            while len(body) < size:
                chunk = conn.recv(min(65536, size - len(body)))
                if not chunk:
                    raise OSError("request cut short")
                body += chunk
            req = json.loads(body)
            kind = req.get("kind")
            if kind == "hello":
                self.register(int(req["pid"]))
            elif kind == "stop":
                self.retire(f"asked to stop (pid {pid})")
            elif kind == "job" and req.get("late") and self.importing_late:
                _log(f"job {_script_name(req['argv'][0])} (client {pid}) held until the late "
                     "modules are in")  # fmt: skip
                self.held.append((conn, fds, req, pid))
                conn, fds = None, []
            elif kind == "job":
                conn = self.job(conn, fds, req, pid)
        except (OSError, ValueError, KeyError) as e:
            _log(f"bad request: {e}")
        finally:
            _close(conn, fds)

    def register(self, pid: int) -> None:
        try:
            self.parents[os.pidfd_open(pid)] = pid
            _log(f"Snakemake {pid} uses this worker")
        except ProcessLookupError:
            pass  # gone already

    def job(self, conn: socket.socket, fds: list[int], req: dict, client: int):
        """Fork the job's child (returns None: ``conn`` is kept until the child is reaped), or
        refuse it (returns ``conn``, to be closed)."""
        changed = _changed(self.stamps)
        if changed:
            self.retire(f"{', '.join(changed)} changed on disk since the worker started")
        why = self.retired or _unforkable() or refusal(req, self.modules, self.env)
        if why or len(fds) != 3:
            why = why or "no standard streams"
            _log(f"refused {_script_name(req['argv'][0])} (client {client}): {why}")
            conn.sendall(json.dumps({"refused": why}).encode() + b"\n")
            return conn
        conn.settimeout(None)
        sys.stdout.flush()
        child = os.fork()
        if child == 0:
            _child(conn, fds, req)  # never returns
        pidfd = os.pidfd_open(child)
        self.children[pidfd] = (child, conn)
        self.clients[conn.fileno()] = pidfd
        conn.sendall(json.dumps({"pid": child}).encode() + b"\n")
        _log(f"job {_script_name(req['argv'][0])} (client {client}) -> pid {child}")
        return None

    def close(self) -> None:
        for pid, _conn in self.children.values():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if not self.retired:
            _remove(self.path, self.path + ".ready")


def _close(conn: socket.socket | None, fds: list[int]) -> None:
    """A request's connection (None: kept for its child) and the standard streams it passed."""
    for fd in fds:
        os.close(fd)
    if conn is not None:
        conn.close()


def _stamps(modules) -> dict:
    """(inode, mtime, size) of each preloaded top-level package's file and its folder (a
    reinstall replaces both)."""
    names = sorted({m.split(".")[0] for m in modules})
    return {n: [_stat(p) for p in _paths(n)] for n in names if _paths(n)}


def _stat(path: str):
    try:
        st = os.stat(path)
        return (st.st_ino, st.st_mtime_ns, st.st_size)
    except OSError:
        return None


def _changed(stamps: dict) -> list[str]:
    return [n for n, was in stamps.items() if [_stat(p) for p in _paths(n)] != was]


def _paths(name: str) -> list[str]:
    origin = getattr(sys.modules.get(name), "__file__", None)
    return [origin, os.path.dirname(origin)] if origin else []


def _unforkable() -> str | None:
    import threading

    if threading.active_count() > 1:
        return f"not serving: {threading.active_count()} Python threads after the imports"
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return "not serving: CUDA was initialised by the imports"
    return None


def _script_name(path: str) -> str:
    """scripts/train.py for Snakemake's copy of it, .snakemake/scripts/tmpXXXXXXXX.train.py."""
    name = os.path.basename(path)
    head, dot, rest = name.partition(".")
    return rest if head.startswith("tmp") and dot and rest.endswith(".py") else name


def _reap(pidfd: int, children: dict) -> None:
    pid, conn = children.pop(pidfd)
    os.close(pidfd)
    _, status = os.waitpid(pid, 0)
    msg = {"signal": os.WTERMSIG(status)} if os.WIFSIGNALED(status) else {
        "exit": os.waitstatus_to_exitcode(status)}  # fmt: skip
    _log(f"pid {pid}: {msg}")
    try:
        conn.sendall(json.dumps(msg).encode() + b"\n")
    except OSError:
        pass  # the client is gone
    conn.close()


def _child(conn: socket.socket, fds: list[int], req: dict) -> None:
    """In the forked child: become the job's process, run its script, exit with its status."""
    code = 1
    try:
        for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD, signal.SIGPIPE, UNNEEDED):
            signal.signal(s, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for i, fd in enumerate(fds):
            os.dup2(fd, i)
            os.close(fd)
        os.closerange(3, conn.fileno())
        os.closerange(conn.fileno() + 1, 1 << 16)
        os.chdir(req["cwd"])
        os.umask(req["umask"])
        os.environ.clear()
        os.environ.update(req["env"])
        os.environ[CHILD_ENV] = "1"
        os.environ[JOB_START_ENV] = repr(req["started"])
        sys.argv[:] = req["argv"]
        sys.path[:] = req["sys_path"]
        for name in [m for m in sys.modules if m == "lorapipe" or m.startswith("lorapipe.")]:
            del sys.modules[name]
        _fresh_process_state(req["env"])
        _watch(conn)
        code = _run_script(req["argv"][0])
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        # The server tells the client the status once it has reaped this process, so the
        # client (and with it Snakemake) never goes on while this one still runs.
        os._exit(code)


def _fresh_process_state(env: dict) -> None:
    """What a new interpreter would have that the fork did not give: fresh random seeds for
    Python's and NumPy's global generators, and the job's thread counts."""
    import random

    random.seed()
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    torch = sys.modules.get("torch")
    threads = env.get("OMP_NUM_THREADS", "")
    if torch is not None and threads.isdigit() and int(threads) > 0:
        torch.set_num_threads(int(threads))


def _watch(conn: socket.socket) -> None:
    """Die with the client: a closed connection means it was killed (or gave up waiting)."""
    import threading

    try:
        if conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
            os.kill(os.getpid(), signal.SIGKILL)
    except BlockingIOError:
        pass

    def watch():
        try:
            while conn.recv(4096):
                pass
        except OSError:
            pass
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="lorapipe-warm-watch", daemon=True).start()


def _run_script(path: str) -> int:
    """Run the job's script as ``__main__``, as ``python path`` would; its exit status."""
    import atexit
    import runpy

    code = 0
    try:
        runpy.run_path(path, run_name="__main__")
    except SystemExit as e:
        if e.code is None:
            code = 0
        elif isinstance(e.code, int):
            code = e.code
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        sys.excepthook(*sys.exc_info())
        code = 130
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    return code


def main(argv: list[str]) -> int:
    if len(argv) in (3, 4) and argv[0] == "serve":
        if len(argv) == 4:  # serve PATH IDLE_S MODULE,...[,|,LATE,...] (tests: a lighter preload)
            names = argv[3].split(",")
            cut = names.index("|") if "|" in names else len(names)
            serve(argv[1], float(argv[2]), tuple(n for n in names[:cut] if n), {},
                  tuple(names[cut + 1 :]))  # fmt: skip
        else:
            serve(argv[1], float(argv[2]), late=PRELOAD_LATE)
        return 0
    if argv == ["stop"]:
        for path in stop_all():
            print(f"asked {path} to stop")
        return 0
    print("usage: python -m lorapipe.warm stop\n"
          "       python -m lorapipe.warm serve SOCKET IDLE_S [MODULES]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
