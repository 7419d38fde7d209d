#!/usr/bin/env bash
# Runs on one machine: a TPU VM worker (launch/tpu.sh calls it on every
# worker over ssh) or a GPU cluster's login node (setup only).
#   setup   create the venv and install the repo plus the accelerator jax
#   start   start the training command detached (setsid + nohup), with a log
#           and a pid file per worker, so an ssh drop does not kill it; wait
#           for its first progress line (or its error); copy the log to the
#           workdir every minute
#   exec    run a command in the repository with the venv (staging, embedding)
#   stop    SIGTERM the run and wait for it to checkpoint and exit
#   status  say whether the run is going, and the errors in its log
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
  start  [--venv DIR] [--log-dir DIR] [--env KEY=VALUE]... [--stage-dir DIR]
         [--check-after S] [--wait-progress S] [--copy-log-to DIR]
         -- COMMAND ...
         Runs COMMAND from the repository root with the venv first on PATH,
         detached; appends to LOG_DIR/train.worker<N>.log and writes
         LOG_DIR/train.worker<N>.pid. Refuses while a run is going. With
         --wait-progress S, returns once the program logged its first
         '[leapalign] progress:' line (status 0), or fails when it exits or
         logs an error first, or after S seconds without one. --copy-log-to
         copies the log to DIR/train.<host>.log (a gs:// URL or a folder)
         every minute while the run goes, and once at its end.
  exec   [--venv DIR] [--env KEY=VALUE]... [--stage-dir DIR] -- COMMAND ...
         Runs COMMAND in the foreground, from the repository root, with the
         venv first on PATH.
  stop   [--log-dir DIR] [--timeout S]  SIGTERM, then wait up to S seconds.
  status [--log-dir DIR]  running or not, and the error lines of the
         current run's log (error:, tracebacks).
  logs   [--log-dir DIR] [--lines N] [--follow]

Defaults: --venv <repo>/.venv, --log-dir ~/leapalign_logs, --timeout 900,
--check-after 5, --wait-progress 0 (off), --lines 100. --stage-dir sets
LEAPALIGN_STAGE_DIR (where leapalign_jax.staging puts copies of gs://
weights and caches). The worker number <N> comes from
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
WAIT_PROGRESS=0
COPY_LOG_TO=""
STAGE_DIR=""
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
      --wait-progress)
        need_value "$1" "$#" "${2-}"
        [[ "$2" =~ ^[0-9]+$ ]] || die "--wait-progress must be a number of seconds, got '$2'"
        WAIT_PROGRESS="$2" && shift 2
        ;;
      --copy-log-to) need_value "$1" "$#" "${2-}" && COPY_LOG_TO="$2" && shift 2 ;;
      --stage-dir) need_value "$1" "$#" "${2-}" && STAGE_DIR="$2" && shift 2 ;;
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

# Lines of a log that report a failure: the program's one-line errors and
# Python tracebacks (their last line names the exception).
ERROR_RE='(^error: |^Traceback \(most recent call last\)|^[A-Za-z_][A-Za-z0-9_.]*(Error|Exception): )'
PROGRESS_RE='\[leapalign\] progress:'

# run_env: exports the venv, --env and --stage-dir for a command run here.
run_env() {
  export VIRTUAL_ENV="$VENV" PATH="$VENV/bin:$PATH"
  local kv
  for kv in ${ENVS[@]+"${ENVS[@]}"}; do
    export "${kv?}"
  done
  if [[ -n "$STAGE_DIR" ]]; then
    export LEAPALIGN_STAGE_DIR="$STAGE_DIR"
  fi
}

# since LOG OFFSET: the log's text after byte OFFSET (this start's lines).
since() {
  tail -c "+$(($2 + 1))" "$1" 2>/dev/null || true
}

# Copies the log to --copy-log-to every LEAPALIGN_LOG_COPY_SECONDS (60)
# while PID lives, and once after; detached like the run itself.
start_log_copier() {
  local pid="$1" log="$2" dst
  dst="${COPY_LOG_TO%/}/train.$(hostname).log"
  (
    cd "$REPO_DIR"
    run_env
    detach=(nohup)
    if command -v setsid >/dev/null 2>&1; then
      detach=(setsid nohup)
    fi
    # shellcheck disable=SC2016  # expands in the inner bash
    exec "${detach[@]}" bash -c '
      pid=$1 log=$2 dst=$3 every=${LEAPALIGN_LOG_COPY_SECONDS:-60}
      copy() { python -m leapalign_jax.staging --push "$log" "$dst" >/dev/null 2>&1; }
      while kill -0 "$pid" 2>/dev/null; do
        copy
        for ((i = 0; i < every * 10; i++)); do
          kill -0 "$pid" 2>/dev/null || break
          sleep 0.1
        done
      done
      copy' log-copier "$pid" "$log" "$dst"
  ) >/dev/null 2>&1 </dev/null &
  note "worker $(worker_id): copying the log to $dst every ${LEAPALIGN_LOG_COPY_SECONDS:-60}s"
}

# wait_progress PIDFILE LOG OFFSET: returns once the run logged its first
# progress line; fails when it exits (or logs an error) first, or times out.
wait_progress() {
  local pidf="$1" log="$2" offset="$3" w deadline text
  w="$(worker_id)"
  deadline=$((SECONDS + WAIT_PROGRESS))
  note "worker $w: waiting up to ${WAIT_PROGRESS}s for the first progress line (compiling can take minutes)"
  while true; do
    text="$(since "$log" "$offset")"
    if grep -Eq "$PROGRESS_RE" <<<"$text"; then
      note "worker $w: $(grep -Eo "$PROGRESS_RE.*" <<<"$text" | head -n 1)"
      return 0
    fi
    if ! is_running "$pidf"; then
      tail -n 20 "$log" >&2 || true
      fail "worker $w: the run exited before its first progress line: $(grep -E "$ERROR_RE" <<<"$text" | tail -n 1)"
    fi
    if ((SECONDS >= deadline)); then
      fail "worker $w: no progress line ${WAIT_PROGRESS}s after start; the run (pid $(cat "$pidf")) goes on: see 'logs' and 'status'"
    fi
    sleep 1
  done
}

cmd_start() {
  ((${#CMD[@]} > 0)) || die "start needs the command after --"
  local w log pidf i offset
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
  offset="$(wc -c <"$log" | tr -d ' ')"
  # setsid puts the run in its own session (no SIGHUP when ssh drops); the
  # inner bash writes its own pid, then execs the command, so the pid file
  # names the training process itself, which is what stop signals.
  (
    cd "$REPO_DIR"
    run_env
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
  if [[ -n "$COPY_LOG_TO" ]]; then
    start_log_copier "$(cat "$pidf")" "$log"
  fi
  if ((WAIT_PROGRESS > 0)); then
    wait_progress "$pidf" "$log" "$offset"
  fi
  note "worker $w: started pid $(cat "$pidf"); log $log"
}

cmd_exec() {
  ((${#CMD[@]} > 0)) || die "exec needs the command after --"
  if [[ "$DRY_RUN" == 1 ]]; then
    print_cmd "${CMD[@]}"
    return 0
  fi
  [[ -x "$VENV/bin/python" ]] || fail "no venv at $VENV (run setup first)"
  cd "$REPO_DIR"
  run_env
  exec "${CMD[@]}"
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
  local w pidf log errors
  w="$(worker_id)"
  pidf="$LOG_DIR/train.worker$w.pid"
  log="$LOG_DIR/train.worker$w.log"
  if is_running "$pidf"; then
    printf 'worker %s: running, pid %s, log %s\n' "$w" "$(cat "$pidf")" "$log"
  else
    printf 'worker %s: not running, log %s\n' "$w" "$log"
  fi
  [[ -f "$log" ]] || return 0
  # The current (last) start's part of the log only.
  errors="$(awk '/^===== .* start: /{n=NR} {l[NR]=$0} END{for(i=n;i<=NR;i++) if(i) print l[i]}' "$log" |
    grep -E "$ERROR_RE" | tail -n 5 || true)"
  if [[ -n "$errors" ]]; then
    printf 'worker %s: errors in its log:\n' "$w"
    printf '  %s\n' "${errors//$'\n'/$'\n'  }"
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
  if [[ -n "$STAGE_DIR" ]]; then
    STAGE_DIR="$(abspath "$STAGE_DIR")"
  fi
  if [[ -n "$COPY_LOG_TO" && "$COPY_LOG_TO" != *://* ]]; then
    COPY_LOG_TO="$(abspath "$COPY_LOG_TO")"
  fi
  case "$SUBCMD" in
    setup) cmd_setup ;;
    start) cmd_start ;;
    exec) cmd_exec ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    logs) cmd_logs ;;
    "") die "missing subcommand (setup|start|exec|stop|status|logs); see --help" ;;
    *) die "unknown subcommand '$SUBCMD' (expected setup|start|exec|stop|status|logs)" ;;
  esac
}

main "$@"
