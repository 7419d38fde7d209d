#!/usr/bin/env bash
# Submits leapalign_jax to a SLURM GPU cluster: builds the sbatch command for
# launch/slurm.sbatch (one process per node, all of the node's GPUs each;
# SIGTERM before the time limit, checkpoint, requeue). --dry-run prints the
# sbatch command, then what the batch script would do on the allocation.
# See launch/README.md.
set -euo pipefail

LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(dirname "$LAUNCH_DIR")"
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$LAUNCH_DIR/common.sh"

usage() {
  cat <<'EOF'
usage: launch/slurm.sh submit --nodes N --config configs/RUN.py --workdir DIR
                       [options] [--config.key=value ...] [-- extra program flags]

One training process per node drives all of that node's GPUs (JAX's usual
multi-node layout); launch/slurm.sbatch sets the coordinator environment.

  --nodes N              number of nodes (required)
  --gpus-per-node G      default 8
  --config FILE          configs/<run>.py[:arg] (required)
  --workdir DIR          checkpoints: a shared filesystem path or gs://... (required)
  --time T               wall-clock limit, e.g. 24:00:00 (default: the partition's)
  --partition P  --account A  --qos Q  --job-name NAME (default leapalign)
  --cpus-per-task N      CPUs for each node's process (default: the cluster's)
  --term-before S        SIGTERM the program S seconds before the time limit,
                         then requeue (default 300)
  --venv DIR             python environment (default <repo>/.venv)
  --log-dir DIR          batch and per-node logs (default <repo>/logs/slurm)
  --env KEY=VALUE        extra environment for the program (repeatable; printed,
                         so not for secrets)
  --sbatch-arg ARG       extra sbatch option, e.g. --sbatch-arg=--constraint=h100
  --dry-run              print the commands instead of submitting
EOF
}

SUBCMD=""
NODES=""
GPUS_PER_NODE=8
CONFIG=""
WORKDIR=""
TIME_LIMIT=""
PARTITION=""
ACCOUNT=""
QOS=""
JOB_NAME="leapalign"
CPUS_PER_TASK=""
TERM_BEFORE=300
VENV="$REPO_ROOT/.venv"
LOG_DIR="$REPO_ROOT/logs/slurm"
ENVS=()
SBATCH_ARGS=()
OVERRIDES=()
EXTRA=()

parse_args() {
  normalize_args "$@"
  set -- ${NORMALIZED_ARGS[@]+"${NORMALIZED_ARGS[@]}"}
  while (($# > 0)); do
    case "$1" in
      -h | --help) usage && exit 0 ;;
      --dry-run) DRY_RUN=1 && shift ;;
      --nodes)
        need_value "$1" "$#" "${2-}" && need_int "$1" "$2"
        NODES="$2" && shift 2
        ;;
      --gpus-per-node)
        need_value "$1" "$#" "${2-}" && need_int "$1" "$2"
        GPUS_PER_NODE="$2" && shift 2
        ;;
      --config) need_value "$1" "$#" "${2-}" && CONFIG="$2" && shift 2 ;;
      --workdir) need_value "$1" "$#" "${2-}" && WORKDIR="$2" && shift 2 ;;
      --time) need_value "$1" "$#" "${2-}" && TIME_LIMIT="$2" && shift 2 ;;
      --partition) need_value "$1" "$#" "${2-}" && PARTITION="$2" && shift 2 ;;
      --account) need_value "$1" "$#" "${2-}" && ACCOUNT="$2" && shift 2 ;;
      --qos) need_value "$1" "$#" "${2-}" && QOS="$2" && shift 2 ;;
      --job-name) need_value "$1" "$#" "${2-}" && JOB_NAME="$2" && shift 2 ;;
      --cpus-per-task)
        need_value "$1" "$#" "${2-}" && need_int "$1" "$2"
        CPUS_PER_TASK="$2" && shift 2
        ;;
      --term-before)
        need_value "$1" "$#" "${2-}" && need_int "$1" "$2"
        TERM_BEFORE="$2" && shift 2
        ;;
      --venv) need_value "$1" "$#" "${2-}" && VENV="$2" && shift 2 ;;
      --log-dir) need_value "$1" "$#" "${2-}" && LOG_DIR="$2" && shift 2 ;;
      --env)
        need_value "$1" "$#" "${2-}"
        need_env_assignment "$2"
        ENVS+=("$2") && shift 2
        ;;
      --sbatch-arg)
        [[ $# -ge 2 && "${2-}" == -* ]] ||
          die "--sbatch-arg needs an sbatch option, e.g. --sbatch-arg=--constraint=h100"
        SBATCH_ARGS+=("$2") && shift 2
        ;;
      --config.*) check_override "$1" && OVERRIDES+=("$1") && shift ;;
      --) shift && EXTRA=("$@") && break ;;
      -*) die "unknown option '$1' (see --help)" ;;
      *)
        [[ -z "$SUBCMD" ]] || die "unexpected argument '$1' (see --help)"
        SUBCMD="$1" && shift
        ;;
    esac
  done
}

# Makes a path absolute against the repository root (sbatch runs there).
abspath() {
  case "$1" in
    /* | gs://*) printf '%s' "$1" ;;
    *) printf '%s/%s' "$REPO_ROOT" "$1" ;;
  esac
}

cmd_submit() {
  [[ -n "$NODES" ]] || die "submit needs --nodes N"
  [[ -n "$CONFIG" ]] || die "submit needs --config configs/<run>.py"
  check_config_path "$CONFIG"
  [[ -n "$WORKDIR" ]] || die "submit needs --workdir (a shared path or gs://...)"
  [[ "$JOB_NAME" =~ ^[A-Za-z0-9_.-]+$ ]] ||
    die "--job-name may hold letters, digits and ._- only, got '$JOB_NAME'"
  WORKDIR="$(abspath "$WORKDIR")"
  VENV="$(abspath "$VENV")"
  LOG_DIR="$(abspath "$LOG_DIR")"

  local sbatch=(sbatch --chdir="$REPO_ROOT" --job-name="$JOB_NAME"
    --nodes="$NODES" --ntasks-per-node=1 --gpus-per-node="$GPUS_PER_NODE"
    --signal="B:USR1@$TERM_BEFORE" --requeue --open-mode=append
    --output="$LOG_DIR/%x-%j.out")
  [[ -z "$TIME_LIMIT" ]] || sbatch+=(--time="$TIME_LIMIT")
  [[ -z "$PARTITION" ]] || sbatch+=(--partition="$PARTITION")
  [[ -z "$ACCOUNT" ]] || sbatch+=(--account="$ACCOUNT")
  [[ -z "$QOS" ]] || sbatch+=(--qos="$QOS")
  [[ -z "$CPUS_PER_TASK" ]] || sbatch+=(--cpus-per-task="$CPUS_PER_TASK")
  sbatch+=(${SBATCH_ARGS[@]+"${SBATCH_ARGS[@]}"})

  local script_args=(--config "$CONFIG" --workdir "$WORKDIR" --venv "$VENV"
    --log-dir "$LOG_DIR")
  local kv
  for kv in ${ENVS[@]+"${ENVS[@]}"}; do
    script_args+=(--env "$kv")
  done
  script_args+=(${OVERRIDES[@]+"${OVERRIDES[@]}"})
  if ((${#EXTRA[@]} > 0)); then
    script_args+=(-- "${EXTRA[@]}")
  fi

  # SLURM does not create the --output directory; the batch log needs it.
  run mkdir -p "$LOG_DIR"
  run "${sbatch[@]}" "$LAUNCH_DIR/slurm.sbatch" "${script_args[@]}"
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '# on the allocation, launch/slurm.sbatch would run:\n'
    env -u SLURM_JOB_ID -u SLURM_JOB_NODELIST -u SLURM_RESTART_COUNT \
      -u SLURM_CPUS_ON_NODE SLURM_JOB_NUM_NODES="$NODES" \
      SLURM_JOB_NAME="$JOB_NAME" ${CPUS_PER_TASK:+SLURM_CPUS_PER_TASK="$CPUS_PER_TASK"} \
      bash "$LAUNCH_DIR/slurm.sbatch" --dry-run "${script_args[@]}"
  else
    note "per-node logs: $LOG_DIR/$JOB_NAME-<jobid>-r<restart>-node<n>.log"
  fi
}

main() {
  parse_args "$@"
  case "$SUBCMD" in
    submit) cmd_submit ;;
    "") die "missing subcommand (submit); see --help" ;;
    *) die "unknown subcommand '$SUBCMD' (expected submit)" ;;
  esac
}

main "$@"
