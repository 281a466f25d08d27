"""Start-up on a machine without a TPU prints no libtpu errors, and TPU ahead-of-time planning still works."""

import json
import os
import subprocess
import sys

import pytest

from pe_rlhf.sharding.distributed import QUIET_TPU_ENV, has_tpu, quiet_tpu_probe

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LIBTPU_NOISE = ("E0000", "Source Location Trace", "could not determine TPU", "unexpected worker hostname")


def test_quiet_probe_sets_single_host_values_only_without_a_tpu():
    env = {}
    assert quiet_tpu_probe(env, tpu_present=False) is True
    assert env == {"TPU_WORKER_HOSTNAMES": "localhost", "TPU_HOST_BOUNDS": "1,1,1"} == QUIET_TPU_ENV
    assert quiet_tpu_probe(env, tpu_present=False) is False  # already set: nothing to do
    mine = {"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3"}
    quiet_tpu_probe(mine, tpu_present=False)
    assert mine == {"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3", "TPU_HOST_BOUNDS": "1,1,1"}  # the user's value wins
    on_tpu = {}
    assert quiet_tpu_probe(on_tpu, tpu_present=True) is False and on_tpu == {}
    forced = {"JAX_FORCE_TPU_INIT": "1"}
    assert quiet_tpu_probe(forced, tpu_present=False) is False and forced == {"JAX_FORCE_TPU_INIT": "1"}


def test_has_tpu_reads_the_device_files(tmp_path):
    assert has_tpu(str(tmp_path)) is False
    (tmp_path / "dev" / "vfio").mkdir(parents=True)
    (tmp_path / "dev" / "vfio" / "vfio").touch()  # the VFIO control file alone is no TPU
    assert has_tpu(str(tmp_path)) is False
    (tmp_path / "dev" / "vfio" / "0").touch()
    assert has_tpu(str(tmp_path)) is True
    (tmp_path / "dev" / "vfio" / "0").unlink()
    (tmp_path / "dev" / "accel0").touch()
    assert has_tpu(str(tmp_path)) is True


@pytest.mark.slow
@pytest.mark.skipif(has_tpu(), reason="checks start-up on a machine without a TPU")
def test_cli_without_jax_platforms_prints_no_libtpu_errors_and_still_plans_for_tpu(tmp_path):
    """No JAX_PLATFORMS: JAX probes every backend (libtpu's included), then libtpu compiles for v5e:2x2."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS" and not k.startswith("TPU_")}
    env["PYTHONPATH"] = REPO
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "experiments", "run.py"), "--gin_file",
         os.path.join(REPO, "experiments", "configs", "tiny_rm.gin"), "--workdir", str(tmp_path / "plan"),
         "--compile_only", "--topology=v5e:2x2"],
        capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert [line for line in output.splitlines() if any(n in line for n in LIBTPU_NOISE)] == []
    plan = json.load(open(tmp_path / "plan" / "plan.json"))
    assert plan["where"] == "v5e:2x2" and plan["fits"] is True
