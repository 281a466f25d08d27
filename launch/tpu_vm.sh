#!/usr/bin/env bash
# Run experiments/run.py on every worker of a Cloud TPU VM (one host or a pod slice), then delete it.
#
#   launch/tpu_vm.sh --name=rlhf-v5e --zone=us-west4-a --project=my-proj \
#       --accelerator-type=v5litepod-8 --version=v2-alpha-tpuv5-lite \
#       --gin_file=experiments/configs/remax_gemma3_270m.gin --workdir=gs://my-bucket/runs/remax
#
# Steps: create the VM (or a queued resource, --queued) -> copy this repository to all workers ->
# pip install -e '.[tpu]' on all workers -> run the same command on all workers, output streamed
# here -> delete the VM, also when a step fails (unless --keep). --dry-run prints the commands.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail

readonly PROG="launch/tpu_vm.sh"
LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
readonly LAUNCH_DIR
REPO="${PE_RLHF_REPO:-$(dirname "$LAUNCH_DIR")}"  # PE_RLHF_REPO: run another checkout
readonly REPO
# shellcheck source=common.sh
source "$LAUNCH_DIR/common.sh"
readonly REMOTE_DIR="pe-rlhf"  # under the home directory on every worker

usage() {
  cat <<EOF
usage: $PROG --name=NAME --zone=ZONE --accelerator-type=TYPE --version=RUNTIME \\
           --gin_file=FILE --workdir=DIR [--project=PROJECT] [--queued] [--spot] [--keep] [--dry-run] \\
           [-- EXTRA_RUN_PY_ARGS...]

  --name              TPU VM (and queued resource) name: lowercase letters, digits, '-'
  --zone              e.g. us-west4-a
  --project           Google Cloud project (default: gcloud's configured project)
  --accelerator-type  e.g. v5litepod-8, v4-32
  --version           TPU runtime, e.g. v2-alpha-tpuv5-lite, tpu-ubuntu2204-base
  --gin_file          gin file, relative to the repository root (it is copied with the repo) or gs://
  --workdir           output directory of the run; gs://bucket/path for pod slices
  --queued            request through 'gcloud compute tpus queued-resources' and wait until ACTIVE
  --spot              spot (preemptible) capacity
  --keep              do not delete the VM at the end
  --dry-run           print every command instead of running it
  Arguments after '--' are appended to the experiments/run.py command.
EOF
}

dry_run=0
run() {
  if ((dry_run)); then
    quote "$@"
  else
    "$@"
  fi
}

name="" zone="" project="" accelerator_type="" version="" gin_file="" workdir=""
queued=0 spot=0 keep=0
extra=()

set_value() {  # set_value FLAG VALUE
  case "$1" in
    --name) name="$2" ;;
    --zone) zone="$2" ;;
    --project) project="$2" ;;
    --accelerator-type) accelerator_type="$2" ;;
    --version) version="$2" ;;
    --gin_file) gin_file="$2" ;;
    --workdir) workdir="$2" ;;
  esac
}

while (($#)); do
  case "$1" in
    --name=* | --zone=* | --project=* | --accelerator-type=* | --version=* | --gin_file=* | --workdir=*)
      [[ -n "${1#*=}" ]] || die "${1%%=*} needs a value"
      set_value "${1%%=*}" "${1#*=}"
      shift
      ;;
    --name | --zone | --project | --accelerator-type | --version | --gin_file | --workdir)
      [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || die "$1 needs a value"
      set_value "$1" "$2"
      shift 2
      ;;
    --queued) queued=1; shift ;;
    --spot) spot=1; shift ;;
    --keep) keep=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) die "unknown flag '$1'" ;;
  esac
done

missing=()
[[ -n "$name" ]] || missing+=(--name)
[[ -n "$zone" ]] || missing+=(--zone)
[[ -n "$accelerator_type" ]] || missing+=(--accelerator-type)
[[ -n "$version" ]] || missing+=(--version)
[[ -n "$gin_file" ]] || missing+=(--gin_file)
[[ -n "$workdir" ]] || missing+=(--workdir)
((${#missing[@]} == 0)) || die "missing required flags: ${missing[*]}"
[[ "$name" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
  die "--name '$name': use lowercase letters, digits and '-', starting with a letter"
if [[ "$gin_file" != gs://* && ! -f "$REPO/$gin_file" ]]; then
  die "--gin_file '$gin_file' not found under $REPO (give a path relative to the repository root)"
fi

location=(--zone="$zone")
[[ -z "$project" ]] || location+=(--project="$project")
tarball="${TMPDIR:-/tmp}/pe-rlhf-$name.tar.gz"
created=0

cleanup() {
  local rc=$?
  ((dry_run)) || rm -f "$tarball"
  if ((created && !keep)); then
    echo "$PROG: deleting $name" >&2
    if ((queued)); then
      run gcloud compute tpus queued-resources delete "$name" "${location[@]}" --force --quiet ||
        echo "$PROG: warning: could not delete queued resource $name; delete it by hand" >&2
    else
      run gcloud compute tpus tpu-vm delete "$name" "${location[@]}" --quiet ||
        echo "$PROG: warning: could not delete TPU VM $name; delete it by hand" >&2
    fi
  elif ((created)); then
    echo "$PROG: keeping $name (--keep); delete it when done" >&2
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_until_active() {
  local state
  while true; do
    state="$(gcloud compute tpus queued-resources describe "$name" "${location[@]}" \
      --format='value(state.state)')" || state="unknown (describe failed)"
    case "$state" in
      ACTIVE) return 0 ;;
      FAILED | SUSPENDING | SUSPENDED) echo "$PROG: queued resource $name is $state" >&2; exit 1 ;;
    esac
    echo "$PROG: queued resource $name is ${state:-unknown}; waiting" >&2
    sleep "${PE_RLHF_POLL_SECONDS:-30}"
  done
}

# --- create
spot_flag=()
if ((spot)); then spot_flag=(--spot); fi
created=1
if ((queued)); then
  run gcloud compute tpus queued-resources create "$name" "${location[@]}" --node-id="$name" \
    --accelerator-type="$accelerator_type" --runtime-version="$version" ${spot_flag[@]+"${spot_flag[@]}"}
  if ((dry_run)); then
    run gcloud compute tpus queued-resources describe "$name" "${location[@]}" --format='value(state.state)'
  else
    wait_until_active
  fi
else
  run gcloud compute tpus tpu-vm create "$name" "${location[@]}" \
    --accelerator-type="$accelerator_type" --version="$version" ${spot_flag[@]+"${spot_flag[@]}"}
fi

# --- copy the repository and install it on every worker
install_cmd="rm -rf $REMOTE_DIR && mkdir $REMOTE_DIR && tar -xzf $REMOTE_DIR.tar.gz -C $REMOTE_DIR"
install_cmd+=" && cd $REMOTE_DIR && python3 -m pip install -e '.[tpu]'"
run tar -czf "$tarball" -C "$REPO" --exclude=.git --exclude=__pycache__ --exclude='*.egg-info' \
  --exclude=.pytest_cache --exclude='./workdir*' --exclude=./runs .
run gcloud compute tpus tpu-vm scp "$tarball" "$name:$REMOTE_DIR.tar.gz" "${location[@]}" --worker=all
run gcloud compute tpus tpu-vm ssh "$name" "${location[@]}" --worker=all --command="$install_cmd"

# --- run on every worker; jax.distributed finds the other workers through the TPU metadata
run_cmd="cd $REMOTE_DIR && $(quote python3 experiments/run.py --gin_file="$gin_file" --workdir="$workdir" \
  ${extra[@]+"${extra[@]}"})"
run gcloud compute tpus tpu-vm ssh "$name" "${location[@]}" --worker=all --command="$run_cmd"
((dry_run)) || echo "$PROG: run finished on all workers of $name" >&2
