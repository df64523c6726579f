"""status.json writer: record format, KPI persistence, guaranteed final record, concurrent appends."""

from __future__ import annotations

import json
import re
import threading
from datetime import datetime

import pytest
from nvp3d.status import StatusLogger, read_status, status_run


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_record_format(tmp_path):
    path = tmp_path / "sub" / "status.json"
    logger = StatusLogger(path)
    before = datetime.now()
    record = logger.started("go")
    assert set(record) == {"date", "time", "status", "verbosity", "message"}
    month, day, year = (int(x) for x in record["date"].split("/"))
    assert (year, month, day) in {(before.year, before.month, before.day), (datetime.now().year,
                                  datetime.now().month, datetime.now().day)}
    assert re.fullmatch(r"\d{1,2}:\d{1,2}:\d{1,2}", record["time"])
    assert _lines(path) == [record]  # one JSON object per line, exactly what was returned


def test_kpi_persists_and_epoch_fields(tmp_path):
    path = tmp_path / "status.json"
    logger = StatusLogger(path)
    logger.started()
    logger.running("no kpi yet")
    logger.running("metrics", kpi={"PRQ": 12.5})
    logger.epoch_end(epoch=1, max_epoch=3, step=10, max_step=30, time_per_epoch=1.5, eta="0:00:03")
    logger.epoch_end(epoch=2, max_epoch=3, step=20, max_step=30, kpi={"train_loss": 0.5})
    logger.success(kpi={"RSQ": 40.0})
    records = read_status(path)
    assert [r["status"] for r in records] == ["STARTED", "RUNNING", "RUNNING", "RUNNING", "RUNNING", "SUCCESS"]
    assert "kpi" not in records[1]
    assert records[2]["kpi"] == {"PRQ": 12.5}
    assert records[3]["kpi"] == {"PRQ": 12.5}
    assert (records[3]["epoch"], records[3]["max_epoch"], records[3]["step"], records[3]["max_step"]) == (1, 3, 10, 30)
    assert records[4]["kpi"] == {"PRQ": 12.5, "train_loss": 0.5}
    assert records[5]["kpi"] == {"PRQ": 12.5, "train_loss": 0.5, "RSQ": 40.0}
    assert logger.finished


def test_non_json_values_are_made_safe(tmp_path):
    np = pytest.importorskip("numpy")
    logger = StatusLogger(tmp_path / "status.json")
    record = logger.running(kpi={"a": np.float32(0.5), "b": float("nan")}, extra=np.int64(3))
    assert record["kpi"] == {"a": 0.5, "b": None}  # was "nan" (a string); the issue asks for null
    assert record["extra"] == 3
    assert read_status(tmp_path / "status.json")[0] == record


def test_reserved_and_bad_status(tmp_path):
    logger = StatusLogger(tmp_path / "status.json")
    with pytest.raises(ValueError, match="reserved"):
        logger.running(date="x")
    with pytest.raises(ValueError):
        logger.write("DONE")


def test_disabled_logger_writes_nothing(tmp_path):
    logger = StatusLogger(tmp_path / "x" / "status.json", enabled=False)
    logger.started()
    logger.success()
    assert not (tmp_path / "x").exists()
    assert logger.finished


def test_context_success(tmp_path):
    path = tmp_path / "status.json"
    with status_run(path, "start", "done") as status:
        status.running("half way")
    assert [(r["status"], r["message"]) for r in read_status(path)] == [
        ("STARTED", "start"), ("RUNNING", "half way"), ("SUCCESS", "done")
    ]


def test_context_failure_reraises(tmp_path):
    path = tmp_path / "status.json"
    with pytest.raises(RuntimeError, match="boom"), status_run(path):
        raise RuntimeError("boom")
    records = read_status(path)
    assert [r["status"] for r in records] == ["STARTED", "FAILURE"]
    assert records[-1]["message"] == "RuntimeError: boom"


def test_context_keyboard_interrupt_and_exit(tmp_path):
    path = tmp_path / "a.json"
    with pytest.raises(KeyboardInterrupt), status_run(path):
        raise KeyboardInterrupt
    assert read_status(path)[-1]["status"] == "FAILURE"
    path = tmp_path / "b.json"
    with pytest.raises(SystemExit), status_run(path):
        raise SystemExit(0)
    assert read_status(path)[-1]["status"] == "SUCCESS"
    path = tmp_path / "c.json"
    with pytest.raises(SystemExit), status_run(path):
        raise SystemExit(5)
    assert read_status(path)[-1]["status"] == "FAILURE"


def test_context_respects_own_final_record(tmp_path):
    path = tmp_path / "status.json"
    with status_run(path) as status:
        status.failure("data was empty")
    assert [r["status"] for r in read_status(path)] == ["STARTED", "FAILURE"]
    path = tmp_path / "s.json"
    with pytest.raises(ValueError), status_run(path) as status:  # noqa: PT012
        status.success("early")
        raise ValueError("late crash")
    assert [r["status"] for r in read_status(path)] == ["STARTED", "SUCCESS", "FAILURE"]


def test_concurrent_appends_stay_whole_lines(tmp_path):
    path = tmp_path / "status.json"
    loggers = [StatusLogger(path) for _ in range(4)]  # separate objects = separate writers

    def work(i):
        for j in range(50):
            loggers[i].running("x" * 500, writer=i, n=j)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    records = read_status(path)
    assert len(records) == 200
    for i in range(4):
        assert [r["n"] for r in records if r["writer"] == i] == list(range(50))
