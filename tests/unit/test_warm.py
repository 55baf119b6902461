"""lorapipe.warm: a job run in the warm worker is the job, exactly, in a process that has its
libraries imported already; and a job it cannot serve runs cold, as before (#17).

Real processes throughout: a server (preloading torch only, to keep this quick), client jobs
started as Snakemake starts them (``python script.py``), real signals."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lorapipe import warm

pytestmark = pytest.mark.skipif(not warm.supported(), reason="warm workers need Linux pidfds")

SRC = str(Path(warm.__file__).resolve().parents[1])

PROBE = """\
import json, os, sys
pre = {"torch": "torch" in sys.modules,
       "lorapipe": sorted(m for m in sys.modules if m.startswith("lorapipe"))}
from lorapipe.warm import delegate
delegate(wait=True)
"""


def gone(pid: int, within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True  # a zombie: dead, its parent not yet told
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for the module (preloading torch only); (job environment, its log)."""
    log = tmp_path_factory.mktemp("warm") / "warm_worker.log"
    saved = os.environ.get(warm.ENV)
    path = warm.start(str(log), idle_s=0, modules=("torch",))
    env = {**os.environ, "PYTHONPATH": SRC, warm.ENV: os.environ[warm.ENV]}
    if saved is None:
        del os.environ[warm.ENV]
    else:
        os.environ[warm.ENV] = saved
    wait_ready(path)
    yield env, Path(path + ".log")
    warm._send(path, {"kind": "stop"})


def wait_ready(path: str) -> None:
    deadline = time.monotonic() + 120
    while not os.path.exists(path + ".ready"):
        assert time.monotonic() < deadline, Path(path + ".log").read_text()[-2000:]
        time.sleep(0.05)


def job(tmp_path: Path, body: str, env: dict, *args, umask: int | None = None, **kw):
    script = tmp_path / "job.py"
    script.write_text(PROBE + body)
    preexec = (lambda: os.umask(umask)) if umask is not None else None
    return subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True,
                          text=True, preexec_fn=preexec, timeout=120, **kw)  # fmt: skip


REPORT = """\
print(json.dumps({**pre, "pid": os.getpid(), "argv": sys.argv[1:], "cwd": os.getcwd(),
                  "foo": os.environ.get("FOO"), "worker": os.environ.get("LORAPIPE_WARM_CHILD")}))
"""


def test_a_job_runs_in_the_worker_as_itself(tmp_path, server):
    env, _ = server
    work = tmp_path / "work"
    work.mkdir()
    body = REPORT + 'open("made.txt", "w").write("x")\nprint("to stderr", file=sys.stderr)\n'
    body += "sys.exit(3)\n"
    out = job(tmp_path, body, {**env, "FOO": "bar"}, "a", "b c", umask=0o027, cwd=work)
    assert out.returncode == 3, out.stderr
    rec = json.loads(out.stdout)
    assert rec["torch"] is True  # imported already: the worker's
    assert rec["lorapipe"] == []  # lorapipe itself is imported fresh, from disk, in the job
    assert rec["worker"] == "1"
    assert (rec["argv"], rec["cwd"], rec["foo"]) == (["a", "b c"], str(work), "bar")
    assert "to stderr" in out.stderr
    assert (work / "made.txt").stat().st_mode & 0o777 == 0o640  # the job's umask


def test_a_failing_job_fails_with_its_traceback(tmp_path, server):
    env, _ = server
    out = job(tmp_path, REPORT + "raise ValueError('boom in the job')\n", env)
    assert out.returncode == 1
    assert json.loads(out.stdout.splitlines()[0])["torch"] is True
    assert "Traceback" in out.stderr and "ValueError: boom in the job" in out.stderr


@pytest.mark.parametrize("work", ["import time; time.sleep(120)", "sum(range(10**12))"],
                         ids=["sleeping", "holding the GIL"])  # fmt: skip
def test_kill_9_of_the_job_kills_its_work(tmp_path, server, work):
    """Snakemake (or a test) kills the job's process group: the work in the worker dies too,
    also while it holds the GIL in one long C call (no thread of its own could run then)."""
    env, _ = server
    pidfile = tmp_path / "pid"
    script = tmp_path / "job.py"
    script.write_text(PROBE + f"open({str(pidfile)!r}, 'w').write(str(os.getpid()))\n"
                      f"{work}\n")  # fmt: skip
    client = subprocess.Popen([sys.executable, str(script)], env=env)
    deadline = time.monotonic() + 60
    while not pidfile.exists() or not pidfile.read_text():
        assert time.monotonic() < deadline and client.poll() is None
        time.sleep(0.05)
    worker_pid = int(pidfile.read_text())
    assert worker_pid != client.pid
    client.kill()
    client.wait()
    assert gone(worker_pid)


def test_sigterm_of_the_job_stops_its_work_and_the_job_dies_of_it(tmp_path, server):
    env, _ = server
    pidfile = tmp_path / "pid"
    script = tmp_path / "job.py"
    script.write_text(PROBE + f"open({str(pidfile)!r}, 'w').write(str(os.getpid()))\n"
                      "import time\ntime.sleep(120)\n")  # fmt: skip
    client = subprocess.Popen([sys.executable, str(script)], env=env)
    deadline = time.monotonic() + 60
    while not pidfile.exists() or not pidfile.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    client.send_signal(signal.SIGTERM)
    assert client.wait(timeout=30) == -signal.SIGTERM
    assert gone(int(pidfile.read_text()))


@pytest.mark.parametrize("where", ["unset", "no socket", "other host"])
def test_without_a_worker_for_it_a_job_runs_cold(tmp_path, where):
    env = {k: v for k, v in os.environ.items() if k != warm.ENV}
    env["PYTHONPATH"] = SRC
    if where == "no socket":
        env[warm.ENV] = f"{socket.gethostname()}\t{tmp_path / 'none.sock'}"
    elif where == "other host":
        env[warm.ENV] = f"not-{socket.gethostname()}\t{tmp_path / 'none.sock'}"
    out = job(tmp_path, REPORT, env)
    assert out.returncode == 0, out.stderr
    rec = json.loads(out.stdout)
    assert rec["torch"] is False and rec["worker"] is None


def test_a_job_with_another_import_environment_is_refused_and_runs_cold(tmp_path, server):
    env, log = server
    out = job(tmp_path, REPORT, {**env, "HF_HOME": str(tmp_path / "hf")})
    assert out.returncode == 0, out.stderr
    rec = json.loads(out.stdout)
    assert rec["torch"] is False and rec["worker"] is None
    assert "import-time environment differs: HF_HOME" in log.read_text()
    assert "did not take this job (import-time environment differs: HF_HOME)" in out.stderr


def starter(tmp_path: Path, idle_s: float, modules=(), env=None, early=False):
    """A process that starts (or joins) a server as Snakemake's onstart does, then sleeps:
    (process, socket path, server pid or None when it joined a running one). ``early``: first
    `start_early`, as the Snakefile does while it is parsed."""
    prog = textwrap.dedent(f"""
        import time
        from lorapipe import warm
        if {early!r}:
            assert warm.start_early(idle_s={idle_s!r}, modules={modules!r})
        path = warm.start({str(tmp_path / "w.log")!r}, idle_s={idle_s!r}, modules={modules!r})
        print(path, warm._started[0].pid if warm._started else "-", len(warm._started), flush=True)
        time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", prog], stdout=subprocess.PIPE, text=True,
                            env=env or {**os.environ, "PYTHONPATH": SRC})  # fmt: skip
    path, pid, spawned = proc.stdout.readline().split()
    assert int(spawned) <= 1, "one server per key"
    wait_ready(path)
    return proc, path, None if pid == "-" else int(pid)


def test_a_server_started_early_is_the_one_onstart_joins(tmp_path):
    """start_early (the Snakefile, while Snakemake parses and plans) spawns the server; start
    (onstart) waits for that, spawns no second one, greets it and says it was started now; the
    server then lives with that Snakemake as any other."""
    proc, path, pid = starter(tmp_path, idle_s=0, modules=("json",), early=True)
    assert pid is not None
    assert "(started now)" in (tmp_path / "w.log").read_text()
    deadline = time.monotonic() + 30  # the hello is read once the server serves, maybe after .ready
    while f"Snakemake {proc.pid} uses this worker" not in Path(path + ".log").read_text():
        assert time.monotonic() < deadline, Path(path + ".log").read_text()
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert gone(pid)


def test_with_no_idle_time_the_server_exits_with_its_last_snakemake(tmp_path):
    proc, path, pid = starter(tmp_path, idle_s=0)
    assert pid is not None
    proc.kill()
    proc.wait()
    assert gone(pid)
    assert not os.path.exists(path) and not os.path.exists(path + ".ready")
    assert "exiting: no Snakemake and no job for 0 s" in Path(path + ".log").read_text()


def test_the_next_snakemake_finds_the_server_warm_and_stop_ends_it(tmp_path):
    """Idle time: the server outlives the Snakemake that started it, the next one joins it
    (no second server), and `python -m lorapipe.warm stop` ends it."""
    first, path, pid = starter(tmp_path, idle_s=300)
    first.kill()
    first.wait()
    time.sleep(0.5)
    assert not gone(pid, within=0.1)
    second, path2, joined = starter(tmp_path, idle_s=300)
    assert (path2, joined) == (path, None)
    assert "(already running)" in (tmp_path / "w.log").read_text()
    out = subprocess.run([sys.executable, "-m", "lorapipe.warm", "stop"], capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": SRC})  # fmt: skip
    assert f"asked {path} to stop" in out.stdout
    assert gone(pid)
    second.kill()
    second.wait()


def test_a_library_changed_on_disk_retires_the_server(tmp_path):
    """An upgrade under a running server: the job runs cold (it says why), the server takes no
    more jobs and exits, and the next start gets a fresh one."""
    lib = tmp_path / "lib"
    (lib / "probe_lib").mkdir(parents=True)
    (lib / "probe_lib" / "__init__.py").write_text("VERSION = 1\n")
    env = {**os.environ, "PYTHONPATH": f"{SRC}:{lib}"}
    proc, path, pid = starter(tmp_path, idle_s=300, modules=("probe_lib",), env=env)
    job_env = {**env, warm.ENV: f"{socket.gethostname()}\t{path}"}
    before = job(tmp_path, REPORT, job_env)
    assert json.loads(before.stdout)["worker"] == "1", before.stderr
    (lib / "probe_lib" / "__init__.py").write_text("VERSION = 22\n")
    after = job(tmp_path, REPORT, job_env)
    assert after.returncode == 0 and json.loads(after.stdout)["worker"] is None
    assert "did not take this job (probe_lib changed on disk" in after.stderr
    assert gone(pid) and not os.path.exists(path)
    proc.kill()
    proc.wait()


def test_the_socket_folder_is_the_users_alone():
    st = os.stat(warm.socket_dir())
    assert st.st_uid == os.getuid() and st.st_mode & 0o777 == 0o700


def test_a_quick_jobs_pid_and_status_in_one_read_are_both_seen():
    """The server's two lines can reach the job's process in one read: none is lost (the
    status would be, and the job would wait for ever)."""
    a, b = socket.socketpair()
    b.sendall(b'{"pid": 7}\n{"exit": 3}\n')
    b.close()
    assert list(warm._replies(a)) == [{"pid": 7}, {"exit": 3}]
    a.close()


def test_old_logs_and_locks_of_servers_gone_are_pruned(tmp_path):
    """Each key leaves a lock file and a log: those of servers no longer running, untouched for a
    week, are removed when a server is started; a running server's and recent ones are kept."""
    old = time.time() - (warm.STALE_DAYS + 1) * 86400
    names = ["aaaa.lock", "aaaa.sock.log", "bbbb.lock", "bbbb.sock.log", "cccc.lock",
             "cccc.sock.log", "cccc.sock", "other.txt"]  # fmt: skip
    for n in names:
        (tmp_path / n).write_text("x")
        if not n.startswith("bbbb"):
            os.utime(tmp_path / n, (old, old))
    assert warm._prune(str(tmp_path)) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[2:])


def test_a_server_started_early_for_a_run_with_nothing_to_do_exits_with_it(tmp_path):
    """The Snakefile starts the server before Snakemake knows whether anything will run; a run
    with nothing to do never reaches onstart. At its exit the server is told, and exits at once
    (not importing for nobody, then waiting FIRST_HELLO_S for a hello that never comes)."""
    prog = textwrap.dedent("""
        import sys
        from lorapipe import warm
        assert warm.start_early(idle_s=600, modules=("json", "decimal"))
        warm._early[(600, ("json", "decimal"))].join()
        print(warm._started[0].pid, warm._server_path(600, ("json", "decimal")), flush=True)
    """)  # exits without calling start
    out = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": SRC}, check=True)  # fmt: skip
    pid, path = out.stdout.split()
    assert gone(int(pid), within=20), "the unused server is still there"
    assert "had nothing to run" in Path(path + ".log").read_text()
    assert not os.path.exists(path)


def test_a_server_started_early_is_kept_when_another_snakemake_uses_it(tmp_path):
    """...unless another Snakemake came to it meanwhile (its hello waits while the server
    imports): then it stays, for that one."""
    modules = ("torch", "decimal")  # a key of its own; torch: seconds of imports to land in
    env = {**os.environ, "PYTHONPATH": SRC}
    early = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys
        from lorapipe import warm
        assert warm.start_early(idle_s=0, modules={modules!r})
        warm._early[(0, {modules!r})].join()
        print(warm._started[0].pid, flush=True)
        sys.stdin.readline()  # then exit without start: a run with nothing to do
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)  # fmt: skip
    pid = int(early.stdout.readline())
    other = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from lorapipe import warm
        print(warm.start({str(tmp_path / "w.log")!r}, idle_s=0, modules={modules!r}), flush=True)
        time.sleep(120)
    """)], stdout=subprocess.PIPE, text=True, env=env)  # fmt: skip
    try:
        path = other.stdout.readline().strip()  # its hello is sent
        early.communicate("\n", timeout=60)
        deadline = time.monotonic() + 60
        while "another uses it" not in Path(path + ".log").read_text():
            assert time.monotonic() < deadline, Path(path + ".log").read_text()
            time.sleep(0.05)
        wait_ready(path)
        assert not gone(pid, within=1)
    finally:
        other.kill()
        other.wait()
    assert gone(pid)


def test_a_job_that_needs_the_late_modules_is_held_until_they_are_in(tmp_path, monkeypatch):
    """While the server imports its late stage, a plain job is forked at once (it imports what
    it needs itself), and a ``delegate(late=True)`` job (train: mlflow, matplotlib) is forked
    once the late modules are in, so it never imports them beside the server (#17)."""
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "slowlate.py").write_text("import time\ntime.sleep(4)\n")  # a job comes meanwhile
    (lib / "lastlate.py").write_text("import time\ntime.sleep(1)\n")
    monkeypatch.setenv("PYTHONPATH", f"{SRC}{os.pathsep}{lib}")
    monkeypatch.setenv(warm.ENV, "")  # start sets it: restored after the test
    stages = ("json", "|", "slowlate", "lastlate")  # first stage | late stage
    path = warm.start(str(tmp_path / "w.log"), idle_s=0, modules=stages)
    env = {**os.environ}
    try:
        deadline = time.monotonic() + 60
        while "preloaded json in" not in Path(path + ".log").read_text():
            assert time.monotonic() < deadline, Path(path + ".log").read_text()
            time.sleep(0.02)
        assert not os.path.exists(path + ".ready")  # the late stage is still importing
        jobs = {}
        for late in (True, False):
            script = tmp_path / f"job-{late}.py"
            script.write_text(
                "import json, os, sys\npre = 'lastlate' in sys.modules\n"
                f"from lorapipe.warm import delegate\ndelegate(wait=True, late={late})\n"
                "print(json.dumps({'pre': pre, 'worker': os.environ.get('LORAPIPE_WARM_CHILD')}))\n"
            )
            pipe = subprocess.PIPE
            jobs[late] = subprocess.Popen([sys.executable, str(script)], env=env, text=True,
                                          stdout=pipe, stderr=pipe)  # fmt: skip
        out = {late: p.communicate(timeout=60) for late, p in jobs.items()}
        for late, p in jobs.items():
            assert p.returncode == 0, out[late][1]
        held, plain = (json.loads(out[k][0]) for k in (True, False))
        assert held == {"pre": True, "worker": "1"}  # forked after the late stage: imported
        assert plain == {"pre": False, "worker": "1"}  # forked between its two modules
        assert "held until the late modules are in" in Path(path + ".log").read_text()
    finally:
        warm._send(path, {"kind": "stop"})
