#!/usr/bin/env bash
# Submit launch/slurm_gpu.sbatch for a multi-node GPU run of experiments/run.py.
#
#   launch/slurm_submit.sh --nodes=2 --gpus-per-node=8 --partition=gpu --time=04:00:00 \
#       --gin_file=experiments/configs/remax_gemma3_270m.gin --workdir=/shared/runs/remax
# shellcheck source-path=SCRIPTDIR
set -euo pipefail

readonly PROG="launch/slurm_submit.sh"
LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
readonly LAUNCH_DIR
REPO="${PE_RLHF_REPO:-$(dirname "$LAUNCH_DIR")}"  # PE_RLHF_REPO: run another checkout
readonly REPO
# shellcheck source=common.sh
source "$LAUNCH_DIR/common.sh"

usage() {
  cat <<USAGE
usage: $PROG --gin_file=FILE --workdir=DIR [--nodes=N] [--gpus-per-node=G] [--per-gpu]
           [--partition=P] [--account=A] [--time=HH:MM:SS] [--job-name=NAME] [--dry-run]
           [-- EXTRA_RUN_PY_ARGS...]

  --gin_file       gin file, relative to the repository root
  --workdir        output directory; must be on a file system every node sees
  --nodes          number of nodes (default 1)
  --gpus-per-node  GPUs per node (default 8)
  --per-gpu        one task per GPU instead of one task per node
  --partition, --account, --time, --job-name   passed to sbatch (job name default pe-rlhf)
  --dry-run        print the sbatch command instead of running it
  Arguments after '--' are appended to the experiments/run.py command.
USAGE
}

gin_file="" workdir="" nodes=1 gpus_per_node=8 partition="" account="" time_limit="" job_name="pe-rlhf"
per_gpu=0 dry_run=0
extra=()

set_value() {  # set_value FLAG VALUE
  case "$1" in
    --gin_file) gin_file="$2" ;;
    --workdir) workdir="$2" ;;
    --nodes) nodes="$2" ;;
    --gpus-per-node) gpus_per_node="$2" ;;
    --partition) partition="$2" ;;
    --account) account="$2" ;;
    --time) time_limit="$2" ;;
    --job-name) job_name="$2" ;;
  esac
}

while (($#)); do
  case "$1" in
    --gin_file=* | --workdir=* | --nodes=* | --gpus-per-node=* | --partition=* | --account=* | --time=* | --job-name=*)
      [[ -n "${1#*=}" ]] || die "${1%%=*} needs a value"
      set_value "${1%%=*}" "${1#*=}"
      shift
      ;;
    --gin_file | --workdir | --nodes | --gpus-per-node | --partition | --account | --time | --job-name)
      [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || die "$1 needs a value"
      set_value "$1" "$2"
      shift 2
      ;;
    --per-gpu) per_gpu=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) die "unknown flag '$1'" ;;
  esac
done

missing=()
[[ -n "$gin_file" ]] || missing+=(--gin_file)
[[ -n "$workdir" ]] || missing+=(--workdir)
((${#missing[@]} == 0)) || die "missing required flags: ${missing[*]}"
[[ "$nodes" =~ ^[1-9][0-9]*$ ]] || die "--nodes '$nodes' is not a positive integer"
[[ "$gpus_per_node" =~ ^[1-9][0-9]*$ ]] || die "--gpus-per-node '$gpus_per_node' is not a positive integer"
[[ -f "$REPO/$gin_file" ]] ||
  die "--gin_file '$gin_file' not found under $REPO (give a path relative to the repository root)"

tasks_per_node=1
if ((per_gpu)); then tasks_per_node="$gpus_per_node"; fi
cmd=(sbatch --job-name="$job_name" --nodes="$nodes" --ntasks-per-node="$tasks_per_node"
  --gpus-per-node="$gpus_per_node")
[[ -z "$partition" ]] || cmd+=(--partition="$partition")
[[ -z "$account" ]] || cmd+=(--account="$account")
[[ -z "$time_limit" ]] || cmd+=(--time="$time_limit")
cmd+=(--chdir="$REPO" "$LAUNCH_DIR/slurm_gpu.sbatch" --gin_file="$gin_file" --workdir="$workdir"
  ${extra[@]+"${extra[@]}"})

if ((dry_run)); then
  quote "${cmd[@]}"
else
  "${cmd[@]}"
fi
