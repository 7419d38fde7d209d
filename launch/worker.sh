#!/usr/bin/env bash
# Runs on one machine: a TPU VM worker (launch/tpu.sh calls it on every
# worker over ssh) or a GPU cluster's login node (setup only).
#   setup   create the venv and install the repo plus the accelerator jax
#   start   start the training command detached (setsid + nohup), with a log
#           and a pid file per worker, so an ssh drop does not kill it
#   stop    SIGTERM the run and wait for it to checkpoint and exit
#   status  say whether the run is going
#   logs    tail this worker's log
# Relative --venv / --log-dir paths are taken from the current directory
# (the login home when called over ssh). See launch/README.md.
set -euo pipefail

LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(dirname "$LAUNCH_DIR")"
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$LAUNCH_DIR/common.sh"

usage() {
  cat <<'EOF'
usage: launch/worker.sh SUBCOMMAND [options] [-- COMMAND ...]

  setup  [--venv DIR] [--python BIN] [--jax SPEC|none] [--jax-latest]
         python -m venv DIR; pip install -c constraints.txt -e <repo> SPEC
         (default SPEC 'jax[tpu]'; use 'jax[cuda12]' on GPU machines).
         Installs BIN (default python3.11) with apt-get if it is missing.
  start  [--venv DIR] [--log-dir DIR] [--env KEY=VALUE]... [--check-after S]
         -- COMMAND ...
         Runs COMMAND from the repository root with the venv first on PATH,
         detached; appends to LOG_DIR/train.worker<N>.log and writes
         LOG_DIR/train.worker<N>.pid. Refuses while a run is going.
  stop   [--log-dir DIR] [--timeout S]  SIGTERM, then wait up to S seconds.
  status [--log-dir DIR]
  logs   [--log-dir DIR] [--lines N] [--follow]

Defaults: --venv <repo>/.venv, --log-dir ~/leapalign_logs, --timeout 900,
--check-after 5, --lines 100. The worker number <N> comes from
$LEAPALIGN_WORKER_ID, else the TPU metadata server, else the host name
(...-w-N), else 0. --dry-run prints commands instead of running them.
EOF
}

SUBCMD=""
VENV="$REPO_DIR/.venv"
LOG_DIR="${HOME:-.}/leapalign_logs"
PYTHON_BIN="python3.11"
JAX_SPEC="jax[tpu]"
JAX_LATEST=0
CHECK_AFTER=5
TIMEOUT=900
LINES=100
FOLLOW=0
ENVS=()
CMD=()

parse_args() {
  normalize_args "$@"
  set -- ${NORMALIZED_ARGS[@]+"${NORMALIZED_ARGS[@]}"}
  while (($# > 0)); do
    case "$1" in
      -h | --help) usage && exit 0 ;;
      --dry-run) DRY_RUN=1 && shift ;;
      --venv) need_value "$1" "$#" "${2-}" && VENV="$2" && shift 2 ;;
      --log-dir) need_value "$1" "$#" "${2-}" && LOG_DIR="$2" && shift 2 ;;
      --python) need_value "$1" "$#" "${2-}" && PYTHON_BIN="$2" && shift 2 ;;
      --jax) need_value "$1" "$#" "${2-}" && JAX_SPEC="$2" && shift 2 ;;
      --jax-latest) JAX_LATEST=1 && shift ;;
      --env)
        need_value "$1" "$#" "${2-}"
        need_env_assignment "$2"
        ENVS+=("$2") && shift 2
        ;;
      --check-after) need_value "$1" "$#" "${2-}" && CHECK_AFTER="$2" && shift 2 ;;
      --timeout)
        need_value "$1" "$#" "${2-}" && need_int "$1" "$2"
        TIMEOUT="$2" && shift 2
        ;;
      --lines)
        need_value "$1" "$#" "${2-}" && need_int "$1" "$2"
        LINES="$2" && shift 2
        ;;
      --follow) FOLLOW=1 && shift ;;
      --) shift && CMD=("$@") && break ;;
      -*) die "unknown option '$1' (see --help)" ;;
      *)
        [[ -z "$SUBCMD" ]] || die "unexpected argument '$1' (see --help)"
        SUBCMD="$1" && shift
        ;;
    esac
  done
  [[ "$CHECK_AFTER" =~ ^[0-9]+(\.[0-9]+)?$ ]] ||
    die "--check-after must be a number of seconds, got '$CHECK_AFTER'"
}

# Makes a path absolute against the current directory.
abspath() {
  case "$1" in
    /*) printf '%s' "$1" ;;
    *) printf '%s/%s' "$PWD" "$1" ;;
  esac
}

# This worker's index within the slice.
worker_id() {
  local id="${LEAPALIGN_WORKER_ID:-}" host
  if [[ -z "$id" ]] && command -v curl >/dev/null 2>&1; then
    id="$(curl -sf --max-time 2 -H 'Metadata-Flavor: Google' \
      'http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number' \
      2>/dev/null || true)"
  fi
  if [[ ! "$id" =~ ^[0-9]+$ ]]; then
    host="$(hostname)"
    if [[ "$host" =~ -w-([0-9]+)$ ]]; then
      id="${BASH_REMATCH[1]}"
    else
      id=0
    fi
  fi
  printf '%s' "$id"
}

# alive PID: true while the process exists and is not a zombie (an exited
# run is re-parented and may wait a moment for its reaper).
alive() {
  local state
  kill -0 "$1" 2>/dev/null || return 1
  state="$(ps -o stat= -p "$1" 2>/dev/null || true)"
  [[ -n "$state" && "$state" != Z* ]]
}

# is_running PIDFILE: true when the pid it names is alive.
is_running() {
  local pid
  [[ -s "$1" ]] || return 1
  pid="$(cat "$1")"
  [[ "$pid" =~ ^[0-9]+$ ]] && alive "$pid"
}

cmd_setup() {
  [[ -f "$REPO_DIR/setup.py" && -f "$REPO_DIR/constraints.txt" ]] ||
    die "$REPO_DIR has no setup.py and constraints.txt"
  local pip=("$VENV/bin/python" -m pip)
  if ! "$PYTHON_BIN" -c 'import ensurepip, venv' >/dev/null 2>&1; then
    command -v apt-get >/dev/null 2>&1 ||
      fail "$PYTHON_BIN with venv support is missing; install it first"
    note "installing $PYTHON_BIN and $PYTHON_BIN-venv with apt-get"
    run sudo apt-get -o DPkg::Lock::Timeout=600 update -q
    run sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 \
      install -y -q "$PYTHON_BIN" "$PYTHON_BIN-venv"
  fi
  if [[ ! -x "$VENV/bin/python" ]]; then
    run "$PYTHON_BIN" -m venv "$VENV"
  fi
  run "${pip[@]}" install -q --upgrade pip
  # The accelerator jax goes in with the constraints, so jax stays at the
  # tested pin and the jax[tpu] / jax[cuda12] extra picks the matching
  # libtpu / CUDA plugin. --jax-latest then upgrades to the newest release.
  if [[ "$JAX_SPEC" == none ]]; then
    run "${pip[@]}" install -q -c "$REPO_DIR/constraints.txt" -e "$REPO_DIR"
  else
    run "${pip[@]}" install -q -c "$REPO_DIR/constraints.txt" -e "$REPO_DIR" \
      "$JAX_SPEC"
    if [[ "$JAX_LATEST" == 1 ]]; then
      run "${pip[@]}" install -q -U "$JAX_SPEC"
    fi
  fi
  run "$VENV/bin/python" -c \
    'import jax, leapalign_jax; print("jax", jax.__version__, "leapalign_jax", leapalign_jax.__version__)'
}

cmd_start() {
  ((${#CMD[@]} > 0)) || die "start needs the command after --"
  local w log pidf i
  w="$(worker_id)"
  log="$LOG_DIR/train.worker$w.log"
  pidf="$LOG_DIR/train.worker$w.pid"
  if [[ "$DRY_RUN" == 1 ]]; then
    note "worker $w: would run from $REPO_DIR, detached, log $log:"
    if ((${#ENVS[@]} > 0)); then
      print_cmd env "${ENVS[@]}" "${CMD[@]}"
    else
      print_cmd "${CMD[@]}"
    fi
    return 0
  fi
  [[ -x "$VENV/bin/python" ]] || fail "no venv at $VENV (run setup first)"
  mkdir -p "$LOG_DIR"
  if is_running "$pidf"; then
    fail "worker $w: a run is already going (pid $(cat "$pidf"), log $log); stop it first"
  fi
  rm -f "$pidf"
  printf '===== %s %s start: %s\n' "$(date -u '+%Y-%m-%dT%H:%M:%SZ')" \
    "$(hostname)" "$(join_quoted "${CMD[@]}")" >>"$log"
  # setsid puts the run in its own session (no SIGHUP when ssh drops); the
  # inner bash writes its own pid, then execs the command, so the pid file
  # names the training process itself, which is what stop signals.
  (
    cd "$REPO_DIR"
    export VIRTUAL_ENV="$VENV" PATH="$VENV/bin:$PATH"
    for kv in ${ENVS[@]+"${ENVS[@]}"}; do
      export "${kv?}"
    done
    detach=(nohup)
    if command -v setsid >/dev/null 2>&1; then
      detach=(setsid nohup)
    fi
    # shellcheck disable=SC2016  # $$ and $@ expand in the inner bash
    exec "${detach[@]}" bash -c 'echo "$$" >"$0"; exec "$@"' "$pidf" "${CMD[@]}"
  ) >>"$log" 2>&1 </dev/null &
  for ((i = 0; i < 100; i++)); do
    [[ -s "$pidf" ]] && break
    sleep 0.05
  done
  sleep "$CHECK_AFTER"
  if ! is_running "$pidf"; then
    tail -n 20 "$log" >&2 || true
    fail "worker $w: the run is not running ${CHECK_AFTER}s after start (log $log)"
  fi
  note "worker $w: started pid $(cat "$pidf"); log $log"
}

cmd_stop() {
  local w pidf pid deadline
  w="$(worker_id)"
  pidf="$LOG_DIR/train.worker$w.pid"
  if ! is_running "$pidf"; then
    note "worker $w: no run going"
    return 0
  fi
  pid="$(cat "$pidf")"
  run kill -TERM "$pid"
  [[ "$DRY_RUN" == 1 ]] && return 0
  note "worker $w: sent SIGTERM to pid $pid; waiting up to ${TIMEOUT}s for it to checkpoint and exit"
  deadline=$((SECONDS + TIMEOUT))
  while alive "$pid"; do
    if ((SECONDS >= deadline)); then
      fail "worker $w: pid $pid still running after ${TIMEOUT}s (kill -KILL $pid to force)"
    fi
    sleep 0.2
  done
  note "worker $w: stopped"
}

cmd_status() {
  local w pidf log
  w="$(worker_id)"
  pidf="$LOG_DIR/train.worker$w.pid"
  log="$LOG_DIR/train.worker$w.log"
  if is_running "$pidf"; then
    printf 'worker %s: running, pid %s, log %s\n' "$w" "$(cat "$pidf")" "$log"
  else
    printf 'worker %s: not running, log %s\n' "$w" "$log"
  fi
}

cmd_logs() {
  local w log
  w="$(worker_id)"
  log="$LOG_DIR/train.worker$w.log"
  if [[ "$DRY_RUN" != 1 && ! -f "$log" ]]; then
    fail "worker $w: no log at $log (has run been started?)"
  fi
  if [[ "$FOLLOW" == 1 ]]; then
    run tail -n "$LINES" -F "$log"
  else
    run tail -n "$LINES" "$log"
  fi
}

main() {
  parse_args "$@"
  VENV="$(abspath "$VENV")"
  LOG_DIR="$(abspath "$LOG_DIR")"
  case "$SUBCMD" in
    setup) cmd_setup ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    logs) cmd_logs ;;
    "") die "missing subcommand (setup|start|stop|status|logs); see --help" ;;
    *) die "unknown subcommand '$SUBCMD' (expected setup|start|stop|status|logs)" ;;
  esac
}

main "$@"
