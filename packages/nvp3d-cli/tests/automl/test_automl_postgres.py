"""The shared-study path against a real PostgreSQL server (started by the test on 127.0.0.1 in a temp dir,
as user ``nobody`` when we are root, since postgres refuses to run as root): two search processes share one
study as two nodes would, and a trial whose worker stopped sending heartbeats is failed and retried."""

from __future__ import annotations

import glob
import io
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import optuna
import pytest
from nvp3d.automl.command import run_automl

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    """URL of a throw-away PostgreSQL server; skipped with the reason when one cannot be started here."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or in /usr/lib/postgresql")
    as_user: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="nvp3d_pg_"))
    if os.geteuid() == 0:  # postgres refuses to run as root
        runuser = shutil.which("runuser")
        if not runuser:
            shutil.rmtree(root)
            pytest.skip("running as root and runuser is missing: cannot start postgres unprivileged")
        as_user = [runuser, "-u", "nobody", "--"]
        shutil.chown(root, "nobody")
    data, port = root / "data", _free_port()
    try:
        subprocess.run([*as_user, initdb, "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync"],
                       check=True, capture_output=True, text=True, timeout=120)
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", "60", "-o",
                        f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off", "start"],
                       check=True, capture_output=True, text=True, timeout=120)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        log = (root / "server.log").read_text() if (root / "server.log").is_file() else ""
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"PostgreSQL did not start: {getattr(exc, 'stderr', '') or exc} {log[-300:]}")
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True,
                       timeout=60)
        shutil.rmtree(root, ignore_errors=True)


def test_two_workers_share_one_study(tmp_path, spec_writer, fake_rung, postgres_url, monkeypatch) -> None:
    spec = spec_writer(tmp_path / "spec.yaml", tmp_path / "shared", max_trials=8, max_epochs=3,
                       storage=postgres_url, study_name="two_nodes")
    outputs: list[io.StringIO] = [io.StringIO(), io.StringIO()]
    codes: list[int] = []

    def node(index: int) -> None:  # each call is what `nvp3d automl` does on one node
        codes.append(run_automl(spec, [f"automl.seed={index}"], out=outputs[index], err=outputs[index]))

    import nvp3d.automl.search as search

    plain = search.run_rung
    monkeypatch.setattr(search, "run_rung", lambda *a, **k: (time.sleep(0.3), plain(*a, **k))[1])  # overlap
    threads = [threading.Thread(target=node, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert codes == [0, 0], [line for o in outputs for line in o.getvalue().splitlines() if "error" in line]
    study = optuna.load_study(study_name="two_nodes", storage=postgres_url.replace("://", "+psycopg://", 1))
    finished = [t for t in study.trials if t.state.is_finished()]
    assert 8 <= len(finished) <= 9  # the last trial in flight on the other node may overshoot by one
    assert sorted(t.number for t in study.trials) == list(range(len(study.trials)))
    assert all(o.getvalue().count("automl: trial ") >= 1 for o in outputs)  # both nodes ran trials
    folders = sorted(p.name for p in (tmp_path / "shared" / "automl").glob("trial_*"))
    assert folders == [f"trial_{t.number:03d}" for t in sorted(study.trials, key=lambda t: t.number)]
    results = json.loads((tmp_path / "shared" / "automl" / "automl_results.json").read_text())
    assert results["storage"].startswith("postgresql+psycopg://postgres@127.0.0.1")


def test_silent_worker_trial_is_failed_and_retried(tmp_path, spec_writer, fake_rung, postgres_url) -> None:
    storage = optuna.storages.RDBStorage(postgres_url.replace("://", "+psycopg://", 1), heartbeat_interval=1,
                                         grace_period=2)
    study = optuna.create_study(storage=storage, study_name="heartbeat")
    # a fixed, trainable lr: a random draw near 1e-2 made the retried tiny run diverge (loss NaN, trial FAIL)
    study.enqueue_trial({"train.optim.lr": 1e-4})
    ghost = study.ask({"train.optim.lr": optuna.distributions.FloatDistribution(1e-6, 1e-2, log=True)})
    assert ghost.params["train.optim.lr"] == pytest.approx(1e-4)
    storage.record_heartbeat(ghost._trial_id)  # a worker on another node started it, then died
    # heartbeat_s 2 (grace 4 s): with 1 s a live trial's own heartbeat went stale on a loaded 2-core machine
    time.sleep(5)
    spec = spec_writer(tmp_path / "spec.yaml", tmp_path / "res", max_trials=2, max_epochs=1,
                       algorithm="random", storage=postgres_url, study_name="heartbeat", heartbeat_s=2)
    out = io.StringIO()
    assert run_automl(spec, [], out=out, err=out) == 0, out.getvalue()[-1500:]
    results = json.loads((tmp_path / "res" / "automl" / "automl_results.json").read_text())
    rows = {r["trial"]: r for r in results["trials"]}
    assert rows[0]["state"] == "INTERRUPTED"
    retry = next(r for r in rows.values() if r["continues_trial"] == 0)
    assert retry["state"] == "COMPLETE", (retry, out.getvalue()[-2000:])
    assert retry["params"]["train.optim.lr"] == pytest.approx(ghost.params["train.optim.lr"])
