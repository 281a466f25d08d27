"""A workdir is written by one run at a time: a second process is refused naming the holder, a lock left by a
killed process is taken over, and one process may take its own workdir again and the stages inside it."""

import contextlib
import json
import os
import signal
import subprocess
import sys

import jax
import pytest

from pe_rlhf.train.config import LoopConfig
from pe_rlhf.train.loop import train_loop
from pe_rlhf.train.workdir_lock import LOCK, WorkdirLockedError, workdir_lock

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
TAKE = "import sys\nfrom pe_rlhf.train.workdir_lock import workdir_lock\nwith workdir_lock(sys.argv[1]):\n"


def take_in_a_subprocess(workdir, then="    pass"):
    return subprocess.run([sys.executable, "-c", TAKE + then, str(workdir)], env=ENV, capture_output=True, text=True,
                          timeout=120)


@contextlib.contextmanager
def held_by_another_process(workdir):
    """Another process holds `workdir` for the block; yields its pid."""
    p = subprocess.Popen([sys.executable, "-c", TAKE + "    print('held', flush=True)\n    sys.stdin.read()",
                          str(workdir)], env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline() == "held\n"
        yield p.pid
    finally:
        p.stdin.close()
        p.wait(timeout=60)


def record(workdir):
    """The lock file's record, None when there is no lock file."""
    path = os.path.join(workdir, LOCK)
    return json.loads(open(path).read()) if os.path.exists(path) else None


def test_a_second_process_is_refused_with_the_holders_pid_and_start_time(tmp_path):
    with workdir_lock(str(tmp_path)):
        held = record(tmp_path)
        assert held["pid"] == os.getpid() and held["started"]
        r = take_in_a_subprocess(tmp_path)
        assert r.returncode == 1
        assert (f"WorkdirLockedError: {tmp_path} is in use by another run: pid {os.getpid()} on {held['host']}, "
                f"started {held['started']}") in r.stderr
    assert os.listdir(tmp_path) == []  # released: the lock file is gone
    assert take_in_a_subprocess(tmp_path).returncode == 0


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path, capsys):
    r = take_in_a_subprocess(tmp_path, "    import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    assert r.returncode == -signal.SIGKILL
    dead = record(tmp_path)
    assert dead is not None and dead["pid"] != os.getpid()  # its record is still there
    with workdir_lock(str(tmp_path)):
        assert record(tmp_path)["pid"] == os.getpid()
    assert f"taking over the lock left by pid {dead['pid']} on {dead['host']}, started {dead['started']}" in \
        capsys.readouterr().out


def test_one_process_takes_its_own_workdir_again_and_the_stages_inside_it(tmp_path):
    stage = tmp_path / "rl"
    with workdir_lock(str(tmp_path)):  # run.py
        with workdir_lock(str(tmp_path)):  # the training loop of a one-stage job
            pass
        with workdir_lock(str(stage)):  # a driver's stage in its sub-workdir
            assert record(stage)["pid"] == os.getpid()
            assert take_in_a_subprocess(stage).returncode == 1
        assert record(stage) is None
        assert record(tmp_path)["pid"] == os.getpid()  # still held after the inner blocks
        assert take_in_a_subprocess(tmp_path).returncode == 1
    assert record(tmp_path) is None


def test_only_process_0_takes_the_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    with workdir_lock(str(tmp_path)):
        assert not os.path.exists(tmp_path / LOCK)


def test_train_loop_refuses_a_workdir_another_process_trains_in(tmp_path):
    with held_by_another_process(tmp_path) as pid:
        with pytest.raises(WorkdirLockedError, match=f"^{tmp_path} is in use by another run: pid {pid} "):
            train_loop(str(tmp_path), LoopConfig(num_steps=1), job=None)  # refused before the job is touched
    assert os.listdir(tmp_path) == []  # nothing written


@pytest.mark.slow
def test_run_py_refuses_before_writing_config_gin(tmp_path):
    with held_by_another_process(tmp_path) as pid:
        r = subprocess.run([sys.executable, os.path.join(REPO, "experiments", "run.py"), "--gin_file",
                            os.path.join(REPO, "experiments", "configs", "tiny_rm.gin"), "--workdir", str(tmp_path)],
                           env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1
    assert f"is in use by another run: pid {pid} " in r.stderr
    assert os.listdir(tmp_path) == []  # no config.gin
