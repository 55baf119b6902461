"""The warm worker (#17): the model stages' jobs run in a process that has torch, diffusers,
transformers, peft and mlflow imported already.

Importing those costs a model-stage job 2-10 s of its life, more than most jobs of a small run
spend working. So for the length of one local Snakemake invocation (its ``onstart`` calls
`start`) one server process imports them once, and every job that asks (`delegate`) is run in a
child forked from it: the job's own script, Snakemake's preamble included, executed from the top
in that child, with the job's argv, working directory, environment, umask, standard streams and
sys.path. A job is its own process still; it only skips the imports.

What keeps this exact:

- **Code is read fresh.** The server imports third-party libraries only; every ``lorapipe``
  module a job uses is imported in the job's child, from disk (the server's own ``lorapipe`` is
  dropped from the child's ``sys.modules``). A job's code param (``script_code``) therefore
  means what it means in a cold process.
- **Same libraries or no warm start.** The child must resolve each preloaded library from the
  job's own ``sys.path`` to the very file the server loaded, run the same interpreter, and see
  the same import-time environment (``HF_*``, ``TORCH*``, ``PYTHON*`` ...: `IMPORT_ENV`);
  otherwise the server refuses and the job runs cold, as before. So does a job that finds no
  server, a server still importing (unless the job waits: ``delegate(wait=True)``), another
  host's server, or a non-Linux system.
- **Kill anywhere.** The job's own process (the client) stays in Snakemake's process group
  and waits; SIGTERM/SIGINT/SIGHUP are passed on to the child; when the client dies (kill -9 of
  the group) the child sees its connection close and kills itself at once. The server exits
  when the Snakemake process that started it does (a pidfd), killing any child left.
- **Exit status and diagnostics** are the job's: the client exits with the child's status (or
  dies of its signal); tracebacks go to the job's own stderr, logs to its log file.

Transport: a Unix socket in a 0700 folder of this user's (``$XDG_RUNTIME_DIR`` or the temporary
folder), peer credentials checked; a request is JSON, with the job's three standard streams
passed as file descriptors (SCM_RIGHTS). No pickle crosses it.

The server's log (what it preloaded and how long it took, each job served or refused and why)
is ``logs/warm_worker.log`` of the workflow. Off with ``warm_worker: false``.
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
import time

ENV = "LORAPIPE_WARM"  # "<host>\t<socket path>": set for the jobs by `start`
CHILD_ENV = "LORAPIPE_WARM_CHILD"  # set in a served job's environment: do not delegate again
JOB_START_ENV = "LORAPIPE_JOB_START"  # the client's process start (unix time), for jobtime
# Libraries imported once by the server; what a job imports beyond these it imports itself.
PRELOAD = (
    "torch", "numpy", "PIL.Image", "safetensors.torch", "diffusers", "transformers", "peft",
    "peft.utils", "diffusers.optimization", "diffusers.training_utils", "diffusers.utils",
    "webdataset", "mlflow", "mlflow.entities", "mlflow.store.tracking.sqlalchemy_store",
)  # fmt: skip
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
IMPORT_ENV = ("PYTHON", "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "DIFFUSERS_", "TORCH", "PYTORCH_",
              "LD_", "MALLOC_", "KMP_", "GOMP_", "MLFLOW_", "TOKENIZERS_")  # fmt: skip
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


def _import_env(env: dict) -> dict:
    return {k: v for k, v in env.items() if k.startswith(IMPORT_ENV) and k != "PYTHONPATH"}


# --------------------------------------------------------------------------- the workflow side


def start(log_path: str, parent_pid: int | None = None, modules=None) -> str | None:
    """Start a server for this process (Snakemake's main one) and tell its jobs where it is
    (the ``LORAPIPE_WARM`` environment variable). Returns the socket path, or None where warm
    workers are not supported. The server exits when ``parent_pid`` (this process) does.
    ``modules``: what it imports, when not `PRELOAD` (tests)."""
    if not supported():
        return None
    import subprocess

    parent_pid = parent_pid or os.getpid()
    path = os.path.join(socket_dir(), f"{parent_pid}-{os.urandom(4).hex()}.sock")
    os.makedirs(os.path.dirname(os.path.abspath(log_path)) or ".", exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lorapipe.warm", "serve", path, str(parent_pid)]
            + ([",".join(modules)] if modules is not None else []),
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, close_fds=True,
        )  # fmt: skip
    _started.append(proc)  # kept: never waited on, it watches us
    os.environ[ENV] = f"{socket.gethostname()}\t{path}"
    return path


_started: list = []


# --------------------------------------------------------------------------- the job side


def delegate(wait: bool = False) -> None:
    """Run this job in the workflow's warm worker when it serves it: then this process exits
    here with the job's status. Returns (the job runs here, cold) when there is no worker, it
    refuses the job, or it is still importing and ``wait`` is false. Call it first thing."""
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
        _send_request(conn)
        reply = _read_line(conn)
    except OSError:
        return
    if not reply or "pid" not in reply:
        return  # refused (the reason is in the worker's log) or the worker is gone: run cold
    conn.settimeout(None)
    _wait_for(conn, reply["pid"])


def _send_request(conn: socket.socket) -> None:
    from lorapipe import jobtime

    started = jobtime.process_start()
    body = json.dumps({
        "argv": sys.argv, "cwd": os.getcwd(), "env": dict(os.environ),
        "umask": _umask(), "sys_path": sys.path, "executable": os.path.realpath(sys.executable),
        "started": started if started is not None else time.time(),
    }).encode()  # fmt: skip
    data = _HEADER.pack(len(body)) + body
    socket.send_fds(conn, [data[:4096]], [0, 1, 2])
    if len(data) > 4096:
        conn.sendall(data[4096:])


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _read_line(conn: socket.socket) -> dict | None:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = conn.recv(4096)
        if not chunk:
            return None
        buf += chunk
    return json.loads(buf.split(b"\n", 1)[0])


def _wait_for(conn: socket.socket, pid: int) -> None:
    """Wait for the child's status, passing on the signals a job is stopped with; then leave
    this process as the child left."""

    def forward(signum, frame):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, forward)
    status, buf = None, b""
    while status is None:
        try:
            chunk = conn.recv(4096)
        except InterruptedError:
            continue
        if not chunk:
            break
        buf += chunk
        for line in buf.split(b"\n")[:-1]:
            msg = json.loads(line)
            if "exit" in msg or "signal" in msg:
                status = msg
                break
        buf = buf.rsplit(b"\n", 1)[-1]
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


def refusal(req: dict, modules=PRELOAD) -> str | None:
    """Why this server must not run the job (None: it may)."""
    import importlib.machinery

    if req.get("executable") != os.path.realpath(sys.executable):
        return f"another interpreter ({req.get('executable')})"
    mine = _SERVER_ENV if _SERVER_ENV is not None else _import_env(os.environ)
    theirs = _import_env(req["env"])
    if mine != theirs:
        keys = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        return f"import-time environment differs: {', '.join(keys)}"
    for name in sorted({m.split(".")[0] for m in modules}):
        loaded = getattr(sys.modules.get(name), "__file__", None)
        spec = importlib.machinery.PathFinder.find_spec(name, req["sys_path"])
        if spec is None or spec.origin != loaded:
            return f"{name} resolves elsewhere on the job's sys.path"
    return None


def serve(path: str, parent_pid: int, modules=PRELOAD, names=PRELOAD_NAMES) -> None:
    """Listen at ``path`` (bound before the imports, so an early job queues instead of failing),
    import, then serve until ``parent_pid`` exits."""
    parent = os.pidfd_open(parent_pid)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    children: dict[int, tuple[int, socket.socket]] = {}  # pidfd -> (pid, connection)
    try:
        t = time.perf_counter()
        global _SERVER_ENV
        _SERVER_ENV = _import_env(os.environ)  # as the jobs will have it
        os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # never initialise CUDA here
        preload(modules, names)
        why_not = _unforkable()
        _log(f"preloaded in {time.perf_counter() - t:.2f} s" + (f"; {why_not}" if why_not else ""))
        open(path + ".ready", "w").close()
        while True:
            ready, _, _ = select.select([parent, listener, *children], [], [])
            if parent in ready:
                _log(f"workflow process {parent_pid} ended")
                return
            for fd in ready:
                if fd in children:
                    _reap(fd, children)
            if listener in ready:
                _accept(listener, children, why_not, modules)
    finally:
        for pid, _conn in children.values():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in (path, path + ".ready"):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass


_SERVER_ENV: dict | None = None  # the server's import-time environment, before its own changes


def _unforkable() -> str | None:
    import threading

    if threading.active_count() > 1:
        return f"not serving: {threading.active_count()} Python threads after the imports"
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return "not serving: CUDA was initialised by the imports"
    return None


def _accept(listener: socket.socket, children: dict, why_not: str | None, modules) -> None:
    conn, _ = listener.accept()
    fds: list[int] = []
    try:
        conn.settimeout(30)
        pid, uid, _gid = struct.unpack("3i", conn.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))  # fmt: skip
        if uid != os.getuid():
            raise OSError(f"peer uid {uid}")
        msg, fds, _flags, _addr = socket.recv_fds(conn, 4096, 3)
        (size,) = _HEADER.unpack(msg[:4])
        body = msg[4:]
        while len(body) < size:
            chunk = conn.recv(min(65536, size - len(body)))
            if not chunk:
                raise OSError("request cut short")
            body += chunk
        req = json.loads(body)
        why = why_not or refusal(req, modules)
        if why or len(fds) != 3:
            _log(f"refused {_script_name(req['argv'][0])} (client {pid}): "
                 f"{why or 'no standard streams'}")  # fmt: skip
            conn.sendall(b'{"refused": true}\n')
            return
        conn.settimeout(None)
        sys.stdout.flush()
        child = os.fork()
        if child == 0:
            _child(conn, fds, req)  # never returns
        pidfd = os.pidfd_open(child)
        children[pidfd] = (child, conn)
        conn.sendall(json.dumps({"pid": child}).encode() + b"\n")
        _log(f"job {_script_name(req['argv'][0])} (client {pid}) -> pid {child}")
        conn = None  # kept until the child is reaped
    except (OSError, ValueError, KeyError) as e:
        _log(f"bad request: {e}")
    finally:
        for fd in fds:
            os.close(fd)
        if conn is not None:
            conn.close()


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
        for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD, signal.SIGPIPE):
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
        _exiting.append(True)  # the client may go as soon as it reads this: no watchdog kill
        try:
            conn.sendall(json.dumps({"exit": code}).encode() + b"\n")
        except BaseException:
            pass
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


_exiting: list = []  # set in the child once the job's status is decided


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
        if not _exiting:
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
        if len(argv) == 4:  # serve PATH PID MODULE,MODULE (tests: a lighter preload)
            serve(argv[1], int(argv[2]), tuple(n for n in argv[3].split(",") if n), {})
        else:
            serve(argv[1], int(argv[2]))
        return 0
    print("usage: python -m lorapipe.warm serve SOCKET PARENT_PID [MODULES]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
