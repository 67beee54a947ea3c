"""One run per workdir: the lock file, its atomic creation, staleness and takeover, and two
real concurrent runs on one workdir (the second stops at once naming the first; before,
both failed at the first checkpoint or one hung ~300 s). Multi-process runs share one lock.
"""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from e2e import ROOT, cpu_env, main_command, read_metrics, run_multiprocess

from bt_jax import distributed
from bt_jax.distributed import LOCK_NAME, WorkdirBusy, WorkdirLock


def _write_holder(workdir, **fields):
    record = dict(host=socket.gethostname(), pid=os.getpid(), started="earlier")
    record.update(heartbeat=time.time(), command="python -m bt_jax.main ...", token="theirs")
    record.update(fields)
    (workdir / LOCK_NAME).write_text(json.dumps(record))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_the_lock_names_its_run_and_a_second_taker_is_refused(tmp_path):
    first = WorkdirLock(str(tmp_path))
    first.acquire()
    held = json.loads((tmp_path / LOCK_NAME).read_text())
    assert held["host"] == socket.gethostname() and held["pid"] == os.getpid()
    assert held["started"] and held["command"]
    with pytest.raises(WorkdirBusy, match=f"pid {os.getpid()}"):
        WorkdirLock(str(tmp_path)).acquire()
    first.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_release_leaves_a_lock_that_is_not_ours(tmp_path):
    _write_holder(tmp_path, host="elsewhere")
    WorkdirLock(str(tmp_path)).release()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == "theirs"


@pytest.mark.parametrize(
    "holder, reason",
    [
        (dict(pid="dead"), "is no longer running on this host"),  # killed with SIGKILL
        (dict(host="elsewhere", heartbeat=time.time() - 1000), "no heartbeat for"),
    ],
)
def test_a_stale_lock_is_taken_over_and_reported(tmp_path, holder, reason):
    if holder.get("pid") == "dead":
        holder["pid"] = _dead_pid()
    _write_holder(tmp_path, **holder)
    said = []
    lock = WorkdirLock(str(tmp_path))
    lock.acquire(say=said.append)
    (message,) = said
    assert message.startswith(f"took over the stale lock {tmp_path / LOCK_NAME} of the run ")
    assert reason in message
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()


def test_a_live_lock_on_another_host_is_refused_at_once(tmp_path):
    _write_holder(tmp_path, host="node7", pid=1234)
    start = time.monotonic()
    with pytest.raises(WorkdirBusy, match="on host node7, pid 1234") as raised:
        WorkdirLock(str(tmp_path)).acquire()
    assert time.monotonic() - start < 5
    assert "\n" not in str(raised.value)


def test_the_heartbeat_keeps_a_long_run_from_looking_stale(tmp_path):
    lock = WorkdirLock(str(tmp_path), heartbeat_s=0.05, stale_after_s=0.5)
    lock.acquire()
    first = json.loads((tmp_path / LOCK_NAME).read_text())["heartbeat"]
    time.sleep(0.8)
    with pytest.raises(WorkdirBusy):  # older than stale_after_s, but its heartbeat is fresh
        WorkdirLock(str(tmp_path), stale_after_s=0.5).acquire()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["heartbeat"] > first
    lock.release()


RACER = """
import os, sys, time
from bt_jax.distributed import WorkdirBusy, WorkdirLock
path, ready, go = sys.argv[1:]
open(ready, "w").close()
while not os.path.exists(go):
    time.sleep(0.001)
try:
    WorkdirLock(path).acquire()
    print("won")
except WorkdirBusy:
    print("refused")
"""


def test_creation_is_atomic_between_racing_processes(tmp_path):
    """4 processes released at once: exactly one holds the lock."""
    workdir, go = tmp_path / "w", tmp_path / "go"
    workdir.mkdir()
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(workdir), str(tmp_path / f"ready{i}"), str(go)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(4)
    ]
    deadline = time.time() + 120
    while len(list(tmp_path.glob("ready*"))) < 4:
        assert time.time() < deadline
        time.sleep(0.01)
    go.touch()
    outcomes = sorted(r.communicate(timeout=60)[0].strip() for r in racers)
    assert outcomes == ["refused"] * 3 + ["won"]


# ------------------------------------------------------------------------ real runs


@pytest.mark.slow
@pytest.mark.usefixtures("compilation_cache")
def test_a_second_run_on_the_same_workdir_stops_at_once_naming_the_first(tmp_path):
    steps = ["--config.train.stop_after_steps=8", "--config.train.debug_step_delay_s=0.5"]
    first = subprocess.Popen(
        main_command(tmp_path, *steps), cwd=ROOT, env=cpu_env(8),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.time() + 300
    while not (tmp_path / LOCK_NAME).exists():
        assert first.poll() is None and time.time() < deadline, first.communicate()
        time.sleep(0.05)
    second = subprocess.run(
        main_command(tmp_path), cwd=ROOT, env=cpu_env(8), capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert first.poll() is None, "the first run must still be running"
    assert second.returncode == 1
    (line,) = [ln for ln in second.stderr.splitlines() if ln.startswith("bt_jax: error")]
    assert line.startswith("bt_jax: error: the workdir is in use by another run: the run started")
    assert f"pid {first.pid} (" in line and "--config.train.debug_step_delay_s=0.5" in line
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    assert [r["step"] for r in read_metrics(tmp_path)] == list(range(1, 9))
    assert not (tmp_path / LOCK_NAME).exists()  # released at exit


@pytest.mark.slow
def test_processes_of_one_run_share_the_lock_and_all_learn_it_is_taken(tmp_path):
    holder = subprocess.Popen(["sleep", "120"])
    try:
        _write_holder(tmp_path, pid=holder.pid, command="another run")
        result = run_multiprocess(tmp_path, check=False, timeout=300)
    finally:
        holder.kill()
    assert result.returncode != 0
    out = result.stdout + result.stderr
    assert "[p0] bt_jax: error: the workdir is in use by another run" in out
    assert "[p1] bt_jax: error: (from process 0) the workdir is in use by another run" in out
    assert f"pid {holder.pid} (another run)" in out
    assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == "theirs"  # untouched
    assert not (tmp_path / "checkpoints").exists()


def test_hold_takes_the_lock_for_the_run_and_releases_it(tmp_path):
    with pytest.raises(RuntimeError), distributed.hold_workdir(str(tmp_path)):
        assert (tmp_path / LOCK_NAME).exists()
        raise RuntimeError("the run failed")
    assert not (tmp_path / LOCK_NAME).exists()
