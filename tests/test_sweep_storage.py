"""Sweep storages beyond the default journal file, met for real: a throwaway PostgreSQL server (two workers split
a λ grid on it, one worker killed mid-trial and its trial resumed), and ``optuna-dashboard`` opening the journal
file sslbench writes.

The PostgreSQL tests need the server binaries (``initdb``, ``pg_ctl``, ``postgres`` on PATH, in
``$SSLBENCH_PG_BIN`` or Debian's ``/usr/lib/postgresql/*/bin``) and ``psycopg2`` (the ``[test]`` extra); the
dashboard test needs ``optuna_dashboard`` (the ``[test]`` and ``[dashboard]`` extras). Each is skipped with a
one-line reason where its part is missing. initdb refuses to run as root: as root the cluster is made and run
as the unprivileged user ``nobody`` (``runuser``), in a folder that user owns.
"""
from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from sslbench import sweep
from test_sweep import FAST, VOCO, _by_state, _finished_count, mmwhs_data, one_thread  # noqa: F401 - fixtures

PG_TOOLS = ("initdb", "pg_ctl", "postgres")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bin() -> Path | None:
    """The folder holding initdb, pg_ctl and postgres, or None."""
    candidates = [os.environ.get("SSLBENCH_PG_BIN", "")]
    found = shutil.which("initdb")
    candidates.append(str(Path(found).parent) if found else "")
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)     # Debian's packages
    for c in candidates:
        if c and all(Path(c, tool).is_file() and os.access(Path(c, tool), os.X_OK) for tool in PG_TOOLS):
            return Path(c)
    return None


@pytest.fixture(scope="module")
def postgres_server():
    """A PostgreSQL cluster on 127.0.0.1 (free port, socket in its own folder) for this module; yields a
    function that creates a fresh database and returns its SQLAlchemy URL."""
    psycopg2 = pytest.importorskip("psycopg2", reason="psycopg2 is not installed (pip install -e '.[test]')")
    bin_dir = _pg_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl, postgres) not found on PATH, $SSLBENCH_PG_BIN "
                    "or /usr/lib/postgresql/*/bin")
    prefix: list[str] = []
    user = None
    if os.geteuid() == 0:                                   # initdb refuses root: run the cluster as nobody
        try:
            user = pwd.getpwnam("nobody")
        except KeyError:
            pytest.skip("running as root and no user 'nobody' to run PostgreSQL as (initdb refuses root)")
        if not shutil.which("runuser"):
            pytest.skip("running as root and no runuser to start PostgreSQL as 'nobody' (initdb refuses root)")
        prefix = ["runuser", "-u", "nobody", "--"]
    # Not tmp_path: pytest's base folder is private to its owner (0700), so 'nobody' could not reach it.
    home = Path(tempfile.mkdtemp(prefix="sslbench-pg-"))
    data, sock = home / "data", home / "sock"
    sock.mkdir()
    if user is not None:
        for p in (home, sock):
            os.chown(p, user.pw_uid, user.pw_gid)
    port = _free_port()

    def pg(*args: str, timeout: float = 120) -> None:
        done = subprocess.run([*prefix, *args], capture_output=True, text=True, timeout=timeout, cwd=home)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed: {(done.stderr or done.stdout).strip()[-1500:]}")

    pg(str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C",
       "--no-sync")
    pg(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(home / "server.log"), "-w", "-t", "60", "-o",
       f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=50", "start")
    made = []

    def new_database(name: str) -> str:
        conn = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        conn.close()
        made.append(name)
        return f"postgresql://postgres@127.0.0.1:{port}/{name}"

    try:
        yield new_database
    finally:
        try:
            pg(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop", timeout=60)
        finally:
            shutil.rmtree(home, ignore_errors=True)


def _pg_study(url: str):
    import optuna

    storage = sweep.open_storage(url)           # postgresql:// with the driver that is installed named
    (name,) = optuna.get_all_study_names(storage=storage)
    return optuna.load_study(study_name=name, storage=storage)


def _worker(args, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.Popen([sys.executable, "-m", "sslbench.sweep", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


# --------------------------------------------------------------------------------------------------
def test_postgres_storage_two_workers_and_a_killed_one(postgres_server, mmwhs_data, tmp_path):
    """A worker is SIGKILLed in the first λ point (pre-training step 1); two workers then share the study on
    PostgreSQL: one takes the dead worker's point over (resuming its run folder), the other the second point.
    Each point is completed exactly once, by the two live workers, and nothing is left running."""
    url = postgres_server("lambda_grid")
    out = tmp_path / "runs"
    args = ["lambda", "--task", "phantom-mmwhs", "--values", "0.5", "1.0", "--storage", url, "--out", str(out),
            *FAST, *VOCO]
    killed = _worker(args, {"SSLBENCH_KILL_AFTER_STEP": "1"})
    _, stderr = killed.communicate(timeout=600)
    assert killed.returncode == -9, stderr[-2000:]
    (left,) = _pg_study(url).trials
    assert left.state.name == "RUNNING" and left.params["method.params.lambda"] in (0.5, 1.0)
    assert left.system_attrs[sweep.ATTR_WORKER]["pid"] == killed.pid

    workers = [_worker(args), _worker(args)]
    results = [w.communicate(timeout=600) for w in workers]
    for w, (stdout, stderr) in zip(workers, results):
        assert w.returncode == 0, stderr[-2000:]
    assert sum("was left running" in stdout and "is gone" in stdout for stdout, _ in results) == 1

    study = _pg_study(url)
    done = _by_state(study, "COMPLETE")
    assert sorted(t.params["method.params.lambda"] for t in done) == [0.5, 1.0]        # none lost, none twice
    assert {t.system_attrs[sweep.ATTR_WORKER]["pid"] for t in done} == {w.pid for w in workers}
    (dead,) = _by_state(study, "FAIL")
    assert dead.number == left.number and "is gone" in dead.system_attrs[sweep.ATTR_STALE]["reason"]
    retry = next(t for t in done if t.system_attrs.get("retry_history") == [left.number])
    assert retry.params["method.params.lambda"] == left.params["method.params.lambda"]
    assert retry.user_attrs["run_folder"] == left.user_attrs["run_folder"]
    for t in done:
        metrics = json.loads(Path(t.user_attrs["run_folder"], "metrics.json").read_text())
        assert t.value == pytest.approx(metrics["mean_dice"]) and metrics["phantom"] is True
        assert _finished_count(t.user_attrs["run_folder"]) == 1
    pretrain_logs = [p.read_text() for p in (out / "pretrain").rglob("log.txt")]
    # the killed worker died after pre-training step 1 (its checkpoint saved): the retry took that checkpoint
    # over instead of training the step again, so every pre-training log holds its one step exactly once
    assert len(pretrain_logs) == 2 and all(log.count(" step 1 loss ") == 1 for log in pretrain_logs)
    assert not _by_state(study, "RUNNING") and not _by_state(study, "WAITING")
    assert not list(out.rglob("*.journal"))                          # the database was the only storage


def test_optuna_dashboard_opens_the_sweep_journal(tmp_path):
    """optuna-dashboard, given the journal file as sslbench writes it, serves the study over its HTTP API."""
    pytest.importorskip("optuna_dashboard", reason="optuna-dashboard is not installed (pip install -e '.[dashboard]')")
    import optuna

    journal = tmp_path / "sweeps" / "lambda-voco-phantom-mmwhs-tiny-s0-abc123.journal"
    storage = sweep.open_storage(str(journal))                         # exactly how a sweep opens its journal
    study = optuna.create_study(storage=storage, study_name=journal.stem, direction="maximize")
    for value, dice in ((0.5, 0.25), (1.0, 0.75)):
        study.enqueue_trial({"method.params.lambda": value})
        trial = study.ask({"method.params.lambda": optuna.distributions.CategoricalDistribution([0.5, 1.0])})
        study.tell(trial, dice)
    del storage, study

    port = _free_port()
    exe = Path(sys.executable).parent / "optuna-dashboard"               # the README's command, this environment's
    cmd = [str(exe)] if exe.is_file() else [shutil.which("optuna-dashboard") or "optuna-dashboard"]
    server = subprocess.Popen([*cmd, str(journal), "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        body, deadline = None, time.time() + 60
        while body is None and time.time() < deadline:
            assert server.poll() is None, server.communicate()[0][-2000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as resp:
                    body = json.loads(resp.read())
            except OSError:
                time.sleep(0.3)
        assert body is not None, "optuna-dashboard did not answer within 60 s"
        (summary,) = body["study_summaries"]
        assert summary["study_name"] == journal.stem
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{summary['study_id']}", timeout=5) as r:
            detail = json.loads(r.read())
        assert [t["values"] for t in detail["trials"]] == [[0.25], [0.75]]
        (best,) = detail["best_trials"]
        assert best["params"][0]["name"] == "method.params.lambda" and best["params"][0]["param_external_value"] == "1.0"
    finally:
        server.terminate()
        server.wait(timeout=30)
