#!/usr/bin/env bash
# Cloud TPU launcher for leapalign_jax: request a TPU (queued resource or
# plain TPU VM; several slices with --num-slices), install this repository on
# every worker, copy gs:// weights and caches to every worker's disk, embed
# prompts, start the same training command on all workers (detached, one log
# per worker, waiting for each one's first progress line), tail a worker's
# log, stop the run with SIGTERM (the program checkpoints), recreate and
# resume after a preemption, delete.
# Every gcloud command goes through run(), so --dry-run prints them all and
# needs no gcloud. See launch/README.md.
set -euo pipefail

LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(dirname "$LAUNCH_DIR")"
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$LAUNCH_DIR/common.sh"

SUBCOMMANDS="create|status|setup|stage|embed|run|logs|stop|resume|delete"

usage() {
  cat <<'EOF'
usage: launch/tpu.sh SUBCOMMAND --name NAME --zone ZONE [options]
                     [--config.key=value ...] [-- extra program flags]

subcommands:
  create   request the TPU: a queued resource (default) or, with --vm, a TPU VM
  status   describe the TPU, then ask every worker whether the run is going
           and which errors its log shows
  setup    copy this checkout (or clone --repo) to every worker, install a venv
  stage    copy the gs:// weights and caches a config names (or --src URLs)
           to every worker's disk, once (resumable; leapalign_jax.staging)
  embed    embed --prompts into the prompt cache --out gs://... (worker 0 of
           the first slice embeds, the others wait), then stage it
  run      start the training command on every worker, detached, log per
           worker; returns when every worker logged its first progress line
  logs     tail one worker's training log (default worker 0)
  stop     SIGTERM the run on every worker; it checkpoints and exits
  resume   after a preemption or a maintenance event: recreate the TPU if it
           is gone (delete, create --wait), setup, stage, run
  delete   delete the TPU (with --force for a queued resource's node)

common options (environment fallbacks in brackets):
  --name NAME          node and queued-resource id [TPU_NAME]
  --zone ZONE          e.g. us-east5-a [TPU_ZONE, CLOUDSDK_COMPUTE_ZONE]
  --project PROJECT    default: gcloud's project [TPU_PROJECT, CLOUDSDK_CORE_PROJECT]
  --accelerator TYPE   default v5p-32 [TPU_ACCELERATOR]; above -8 is multi-host
                       (tpu7x-* is refused: not supported here yet)
  --num-slices N       N slices of TYPE (multislice over DCN; queued resource
                       with --node-count, nodes NAME-0..N-1) [TPU_NUM_SLICES]
  --vm                 a plain TPU VM instead of a queued resource
  --dry-run            print every gcloud command instead of running it
create:  --runtime VERSION (default: v5p v2-alpha-tpuv5, v5litepod
         v2-alpha-tpuv5-lite, v6e v2-alpha-tpuv6e, v2-v4 tpu-ubuntu2204-base)
         --spot | --best-effort (queued resource only, gcloud alpha) | --reserved
         --wait (poll until the queued resource is ACTIVE)
setup:   --repo URL [--ref REF]  clone on the workers instead of copying this
         checkout (tracked and untracked, not ignored, files)
         --python BIN (python3.11)  --jax SPEC ('jax[tpu]')  --jax-latest
stage:   --config configs/RUN.py[:args] [--config.key=value ...] and/or
         --src gs://BUCKET/PATH (repeatable)
embed:   --config configs/RUN.py[:args] --prompts FILE|gs://...|tfds:...
         --out gs://BUCKET/CACHE [--config.key=value ...]
run:     --config configs/RUN.py (required)
         --workdir gs://BUCKET/RUN (required; gs:// on multi-host slices)
         --env KEY=VALUE (repeatable; not for secrets: it is printed)
         --wait-progress SECONDS (3600) for every worker's first progress
         line; --no-wait returns after the 5 s liveness check
         --config.key=value ...  passed through to the program
         -- ARGS ...             appended to the program's command line
         The log of each worker is copied to WORKDIR/logs/ every minute.
resume:  the options of run (and of create, for the recreated TPU)
logs:    --worker N (0)  --node N (the slice, with --num-slices; 0)
         --lines N (100)  --no-follow
stop:    --timeout SECONDS (900) to wait for the checkpoint
delete:  --yes  skip gcloud's confirmation prompt
worker paths, relative to the login home: --remote-dir (leapalign_jax),
  --venv (leapalign_venv), --log-dir (leapalign_logs), --stage-dir
  (leapalign_stage: the staged copies of gs:// weights and caches)
EOF
}

SUBCMD=""
NAME="${TPU_NAME:-}"
ZONE="${TPU_ZONE:-${CLOUDSDK_COMPUTE_ZONE:-}}"
PROJECT="${TPU_PROJECT:-${CLOUDSDK_CORE_PROJECT:-}}"
ACCEL="${TPU_ACCELERATOR:-v5p-32}"
NUM_SLICES="${TPU_NUM_SLICES:-1}"
RUNTIME=""
USE_VM=0
SPOT=0
BEST_EFFORT=0
RESERVED=0
WAIT=0
REPO_URL=""
REPO_REF="HEAD"
PYTHON_BIN="python3.11"
JAX_SPEC="jax[tpu]"
JAX_LATEST=0
CONFIG=""
WORKDIR=""
PROMPTS=""
OUT=""
WAIT_PROGRESS=3600
SOURCES=()
WORKER=0
NODE=""
LINES=100
FOLLOW=1
TIMEOUT=900
YES=0
REMOTE_DIR="leapalign_jax"
REMOTE_VENV="leapalign_venv"
REMOTE_LOGS="leapalign_logs"
REMOTE_STAGE="leapalign_stage"
ENVS=()
OVERRIDES=()
EXTRA=()

parse_args() {
  normalize_args "$@"
  set -- ${NORMALIZED_ARGS[@]+"${NORMALIZED_ARGS[@]}"}
  while (($# > 0)); do
    case "$1" in
      -h | --help) usage && exit 0 ;;
      --dry-run) DRY_RUN=1 && shift ;;
      --name) need_value "$1" "$#" "${2-}" && NAME="$2" && shift 2 ;;
      --zone) need_value "$1" "$#" "${2-}" && ZONE="$2" && shift 2 ;;
      --project) need_value "$1" "$#" "${2-}" && PROJECT="$2" && shift 2 ;;
      --accelerator) need_value "$1" "$#" "${2-}" && ACCEL="$2" && shift 2 ;;
      --num-slices)
        need_value "$1" "$#" "${2-}" && need_int "$1" "$2"
        NUM_SLICES="$2" && shift 2
        ;;
      --runtime) need_value "$1" "$#" "${2-}" && RUNTIME="$2" && shift 2 ;;
      --vm) USE_VM=1 && shift ;;
      --spot) SPOT=1 && shift ;;
      --best-effort) BEST_EFFORT=1 && shift ;;
      --reserved) RESERVED=1 && shift ;;
      --wait) WAIT=1 && shift ;;
      --repo) need_value "$1" "$#" "${2-}" && REPO_URL="$2" && shift 2 ;;
      --ref) need_value "$1" "$#" "${2-}" && REPO_REF="$2" && shift 2 ;;
      --python) need_value "$1" "$#" "${2-}" && PYTHON_BIN="$2" && shift 2 ;;
      --jax) need_value "$1" "$#" "${2-}" && JAX_SPEC="$2" && shift 2 ;;
      --jax-latest) JAX_LATEST=1 && shift ;;
      --config) need_value "$1" "$#" "${2-}" && CONFIG="$2" && shift 2 ;;
      --workdir) need_value "$1" "$#" "${2-}" && WORKDIR="$2" && shift 2 ;;
      --prompts) need_value "$1" "$#" "${2-}" && PROMPTS="$2" && shift 2 ;;
      --out) need_value "$1" "$#" "${2-}" && OUT="$2" && shift 2 ;;
      --src) need_value "$1" "$#" "${2-}" && SOURCES+=("$2") && shift 2 ;;
      --wait-progress)
        need_value "$1" "$#" "${2-}" && need_int "$1" "$2"
        WAIT_PROGRESS="$2" && shift 2
        ;;
      --no-wait) WAIT_PROGRESS=0 && shift ;;
      --env)
        need_value "$1" "$#" "${2-}"
        need_env_assignment "$2"
        ENVS+=("$2") && shift 2
        ;;
      --config.*) check_override "$1" && OVERRIDES+=("$1") && shift ;;
      --worker)
        need_value "$1" "$#" "${2-}"
        [[ "$2" =~ ^[0-9]+$ ]] || die "--worker must be a worker number, got '$2'"
        WORKER="$2" && shift 2
        ;;
      --lines)
        need_value "$1" "$#" "${2-}" && need_int "$1" "$2"
        LINES="$2" && shift 2
        ;;
      --no-follow) FOLLOW=0 && shift ;;
      --node)
        need_value "$1" "$#" "${2-}"
        [[ "$2" =~ ^[0-9]+$ ]] || die "--node must be a slice number, got '$2'"
        NODE="$2" && shift 2
        ;;
      --timeout)
        need_value "$1" "$#" "${2-}" && need_int "$1" "$2"
        TIMEOUT="$2" && shift 2
        ;;
      --yes) YES=1 && shift ;;
      --remote-dir) need_value "$1" "$#" "${2-}" && REMOTE_DIR="$2" && shift 2 ;;
      --venv) need_value "$1" "$#" "${2-}" && REMOTE_VENV="$2" && shift 2 ;;
      --log-dir) need_value "$1" "$#" "${2-}" && REMOTE_LOGS="$2" && shift 2 ;;
      --stage-dir) need_value "$1" "$#" "${2-}" && REMOTE_STAGE="$2" && shift 2 ;;
      --) shift && EXTRA=("$@") && break ;;
      -*) die "unknown option '$1' (see --help)" ;;
      *)
        [[ -z "$SUBCMD" ]] || die "unexpected argument '$1' (see --help)"
        SUBCMD="$1" && shift
        ;;
    esac
  done
}

# Dies unless a worker path is relative to the home and has no '..': setup
# replaces --remote-dir wholesale, so it must never name the home itself.
check_remote_path() {
  local flag="$1" path="$2"
  if [[ ! "$path" =~ ^[A-Za-z0-9_][A-Za-z0-9._/-]*$ || "$path" =~ (^|/)\.\.?(/|$) ]]; then
    die "$flag must be a path relative to the worker's home (letters, digits, ._-/), got '$path'"
  fi
}

# Number in the accelerator type (v5p-32 -> 32); dies on a malformed type.
accelerator_size() {
  if [[ "$ACCEL" =~ ^tpu7x- ]]; then
    die "--accelerator $ACCEL: TPU7x (Ironwood) is not supported by these scripts yet (its runtime versions, host layout and libtpu have not been checked here); use v5p, v5litepod or v6e"
  fi
  [[ "$ACCEL" =~ ^(v[0-9]+[a-z]*|v5litepod)-([0-9]+)$ ]] ||
    die "--accelerator must look like v5p-32, v5litepod-16 or v6e-8, got '$ACCEL'"
  printf '%s' "${BASH_REMATCH[2]}"
}

# True for multi-host jobs: slices above 8 (every family fits at most 8
# cores or chips on one host: v5p-8, v4-8, v5litepod-8 and v6e-8 are
# single-host) or several slices.
is_multi_host() {
  local size
  size="$(accelerator_size)"
  ((size > 8 || NUM_SLICES > 1))
}

default_runtime() {
  case "$ACCEL" in
    v5p-*) printf 'v2-alpha-tpuv5' ;;
    v5litepod-*) printf 'v2-alpha-tpuv5-lite' ;;
    v6e-*) printf 'v2-alpha-tpuv6e' ;;
    v2-* | v3-* | v4-*) printf 'tpu-ubuntu2204-base' ;;
    *) die "no default --runtime for '$ACCEL'; pass --runtime" ;;
  esac
}

validate_common() {
  case "$SUBCMD" in
    create | status | setup | stage | embed | run | logs | stop | resume | delete) ;;
    "") die "missing subcommand ($SUBCOMMANDS); see --help" ;;
    *) die "unknown subcommand '$SUBCMD' (expected $SUBCOMMANDS)" ;;
  esac
  [[ -n "$NAME" ]] || die "--name is required (or set TPU_NAME)"
  [[ "$NAME" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
    die "--name must be lowercase letters, digits and '-', got '$NAME'"
  [[ -n "$ZONE" ]] || die "--zone is required (or set TPU_ZONE)"
  accelerator_size >/dev/null
  check_remote_path --remote-dir "$REMOTE_DIR"
  check_remote_path --venv "$REMOTE_VENV"
  check_remote_path --log-dir "$REMOTE_LOGS"
  check_remote_path --stage-dir "$REMOTE_STAGE"
  if ((${#EXTRA[@]} + ${#ENVS[@]} > 0)) && [[ "$SUBCMD" != run && "$SUBCMD" != resume ]]; then
    die "--env and '-- ARGS' only apply to 'run' and 'resume'"
  fi
  if ((${#OVERRIDES[@]} > 0)); then
    case "$SUBCMD" in
      run | resume | stage | embed) ;;
      *) die "--config.* overrides only apply to 'run', 'resume', 'stage' and 'embed'" ;;
    esac
  fi
  if ((NUM_SLICES > 1)) && [[ "$USE_VM" == 1 ]]; then
    die "--num-slices needs a queued resource (drop --vm)"
  fi
  LOC=(--zone="$ZONE")
  if [[ -n "$PROJECT" ]]; then
    LOC+=(--project="$PROJECT")
  fi
}

# ssh_workers WORKER REMOTE_ARGV...: runs one command line on worker(s)
# ("all", or a number: of the first slice, or of --node with multislice).
ssh_workers() {
  local worker="$1"
  shift
  ssh_command "$worker" "$(join_quoted "$@")"
}

# ssh_command WORKER COMMAND_LINE: as ssh_workers, for a prepared line.
# Several slices are one queued resource: its ssh reaches every node.
ssh_command() {
  local worker="$1" line="$2" node=0
  if ((NUM_SLICES > 1)); then
    [[ "$worker" == all ]] && node=all
    [[ -z "$NODE" ]] || node="$NODE"
    run gcloud compute tpus queued-resources ssh "$NAME" --node="$node" \
      --worker="$worker" "${LOC[@]}" --command="$line"
  else
    run gcloud compute tpus tpu-vm ssh "$NAME" --worker="$worker" "${LOC[@]}" \
      --command="$line"
  fi
}

# scp_all LOCAL REMOTE_NAME: copies a file to the home of every worker.
scp_all() {
  if ((NUM_SLICES > 1)); then
    run gcloud compute tpus queued-resources scp "$1" "$NAME:$2" \
      --node=all --worker=all "${LOC[@]}"
  else
    run gcloud compute tpus tpu-vm scp "$1" "$NAME:$2" --worker=all "${LOC[@]}"
  fi
}

worker_script() {
  printf '%s/launch/worker.sh' "$REMOTE_DIR"
}

wait_active() {
  local state
  local describe=(gcloud compute tpus queued-resources describe "$NAME"
    "${LOC[@]}" --format='value(state.state)')
  if [[ "$DRY_RUN" == 1 ]]; then
    print_cmd "${describe[@]}"
    note "(--wait repeats this every 30 s until the state is ACTIVE)"
    return 0
  fi
  while true; do
    state="$("${describe[@]}")"
    case "$state" in
      ACTIVE) note "queued resource $NAME is ACTIVE" && return 0 ;;
      FAILED | SUSPENDED) fail "queued resource $NAME is $state" ;;
      *) note "queued resource $NAME is ${state:-UNKNOWN}; checking again in 30 s" ;;
    esac
    sleep 30
  done
}

cmd_create() {
  local runtime="$RUNTIME" cmd
  if [[ -z "$runtime" ]]; then
    runtime="$(default_runtime)"
  fi
  if ((SPOT + BEST_EFFORT + RESERVED > 1)); then
    die "choose at most one of --spot, --best-effort, --reserved"
  fi
  if [[ "$USE_VM" == 1 ]]; then
    [[ "$BEST_EFFORT" == 0 ]] || die "--best-effort needs a queued resource (drop --vm)"
    cmd=(gcloud compute tpus tpu-vm create "$NAME" "${LOC[@]}"
      --accelerator-type="$ACCEL" --version="$runtime")
  else
    if [[ "$BEST_EFFORT" == 1 ]]; then
      cmd=(gcloud alpha)
    else
      cmd=(gcloud)
    fi
    cmd+=(compute tpus queued-resources create "$NAME")
    if ((NUM_SLICES > 1)); then
      # Multislice: N nodes NAME-0 ... NAME-(N-1), one queued resource.
      cmd+=(--node-count="$NUM_SLICES" --node-prefix="$NAME")
    else
      cmd+=(--node-id="$NAME")
    fi
    cmd+=("${LOC[@]}" --accelerator-type="$ACCEL" --runtime-version="$runtime")
  fi
  [[ "$SPOT" == 0 ]] || cmd+=(--spot)
  [[ "$BEST_EFFORT" == 0 ]] || cmd+=(--best-effort)
  [[ "$RESERVED" == 0 ]] || cmd+=(--reserved)
  run "${cmd[@]}"
  if [[ "$WAIT" == 1 && "$USE_VM" == 0 ]]; then
    wait_active
  elif [[ "$USE_VM" == 0 ]]; then
    note "requested; 'launch/tpu.sh status' shows when the queued resource is ACTIVE"
  fi
}

cmd_status() {
  if [[ "$USE_VM" == 1 ]]; then
    run gcloud compute tpus tpu-vm describe "$NAME" "${LOC[@]}"
  else
    run gcloud compute tpus queued-resources describe "$NAME" "${LOC[@]}"
  fi
  ssh_workers all bash "$(worker_script)" status --log-dir "$REMOTE_LOGS" ||
    fail "could not reach the workers (not ACTIVE yet, or setup not run?)"
}

# Packs this checkout's tracked and untracked-but-not-ignored files; sets
# TARBALL. Files deleted from the work tree are skipped.
make_tarball() {
  local listing
  listing="git -C $(shquote "$REPO_ROOT") ls-files -z --cached --others --exclude-standard"
  if [[ "$DRY_RUN" == 1 ]]; then
    TARBALL="${TMPDIR:-/tmp}/leapalign_src.tgz"
    printf '+ %s | tar -czf %s -C %s --null -T -\n' "$listing" \
      "$(shquote "$TARBALL")" "$(shquote "$REPO_ROOT")"
    return 0
  fi
  git -C "$REPO_ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1 ||
    die "$REPO_ROOT is not a git checkout; use --repo URL"
  local list
  TARBALL="$(mktemp "${TMPDIR:-/tmp}/leapalign_src.XXXXXX")"
  list="$TARBALL.list"
  CLEANUP=("$TARBALL" "$list")
  trap 'rm -f "${CLEANUP[@]}"' EXIT
  git -C "$REPO_ROOT" ls-files -z --cached --others --exclude-standard |
    while IFS= read -r -d '' f; do
      if [[ -e "$REPO_ROOT/$f" ]]; then
        printf '%s\0' "$f"
      fi
    done >"$list"
  COPYFILE_DISABLE=1 tar -czf "$TARBALL" -C "$REPO_ROOT" --null -T "$list"
  note "packed $(tr -cd '\0' <"$list" | wc -c | tr -d ' ') files from $REPO_ROOT"
}

cmd_setup() {
  local fetch dir
  dir="$(shquote "$REMOTE_DIR")"
  if [[ -n "$REPO_URL" ]]; then
    fetch="set -e; if [ ! -d $dir/.git ]; then rm -rf $dir; git clone --quiet $(shquote "$REPO_URL") $dir; fi"
    fetch+="; git -C $dir fetch --quiet origin $(shquote "$REPO_REF")"
    fetch+="; git -C $dir checkout --quiet --force FETCH_HEAD"
  else
    make_tarball
    scp_all "$TARBALL" leapalign_src.tgz
    fetch="set -e; rm -rf $dir; mkdir -p $dir; tar -xzf leapalign_src.tgz -C $dir; rm -f leapalign_src.tgz"
  fi
  local install=(bash "$(worker_script)" setup --venv "$REMOTE_VENV"
    --python "$PYTHON_BIN" --jax "$JAX_SPEC")
  [[ "$JAX_LATEST" == 0 ]] || install+=(--jax-latest)
  ssh_command all "$fetch; $(join_quoted "${install[@]}")"
}

# The config overrides as the Python commands take them: key=value.
plain_overrides() {
  local o
  PLAIN_OVERRIDES=()
  for o in ${OVERRIDES[@]+"${OVERRIDES[@]}"}; do
    PLAIN_OVERRIDES+=("${o#--config.}")
  done
}

# worker.sh exec on every worker (or WORKER), with the venv and stage dir.
exec_on() {
  local worker="$1"
  shift
  ssh_workers "$worker" bash "$(worker_script)" exec --venv "$REMOTE_VENV" \
    --stage-dir "$REMOTE_STAGE" -- "$@"
}

cmd_stage() {
  local args=()
  if [[ -n "$CONFIG" ]]; then
    check_config_path "$CONFIG"
    plain_overrides
    args+=(--config "$CONFIG" ${PLAIN_OVERRIDES[@]+"${PLAIN_OVERRIDES[@]}"})
  fi
  local src
  for src in ${SOURCES[@]+"${SOURCES[@]}"}; do
    [[ "$src" == gs://?* ]] || die "--src must be gs://BUCKET/PATH, got '$src'"
    args+=(--src "$src")
  done
  ((${#args[@]} > 0)) || die "stage needs --config configs/<run>.py (with gs:// paths) or --src gs://..."
  exec_on all python -m leapalign_jax.staging "${args[@]}"
  note "staged on every worker under ~/$REMOTE_STAGE"
}

cmd_embed() {
  [[ -n "$CONFIG" ]] || die "embed needs --config configs/<run>.py"
  check_config_path "$CONFIG"
  [[ -n "$PROMPTS" ]] || die "embed needs --prompts FILE (.txt, .jsonl, gs://... or tfds:...)"
  [[ "$OUT" == gs://?* ]] ||
    die "embed needs --out gs://BUCKET/CACHE (every worker stages it from there), got '${OUT:-nothing}'"
  plain_overrides
  # Every worker starts (a slice's chips start together); process 0 embeds.
  exec_on all python -m leapalign_jax.embed_prompts --config "$CONFIG" \
    --prompts "$PROMPTS" --out "$OUT" ${PLAIN_OVERRIDES[@]+"${PLAIN_OVERRIDES[@]}"}
  exec_on all python -m leapalign_jax.staging --src "$OUT"
}

check_run_args() {
  [[ -n "$CONFIG" ]] || die "$SUBCMD needs --config configs/<run>.py"
  check_config_path "$CONFIG"
  [[ -n "$WORKDIR" ]] || die "$SUBCMD needs --workdir (gs://BUCKET/RUN on multi-host slices)"
  if is_multi_host && [[ "$WORKDIR" != gs://?* ]]; then
    die "--workdir must be gs://... on multi-host $ACCEL (each host has its own disk), got '$WORKDIR'"
  fi
}

cmd_run() {
  check_run_args
  local train=(python -m leapalign_jax.main --config "$CONFIG"
    --workdir "$WORKDIR" ${OVERRIDES[@]+"${OVERRIDES[@]}"}
    ${EXTRA[@]+"${EXTRA[@]}"})
  local start=(bash "$(worker_script)" start --venv "$REMOTE_VENV"
    --log-dir "$REMOTE_LOGS" --stage-dir "$REMOTE_STAGE"
    --wait-progress "$WAIT_PROGRESS")
  if [[ "$WORKDIR" == gs://?* ]]; then
    start+=(--copy-log-to "${WORKDIR%/}/logs")
  fi
  local kv
  for kv in ${ENVS[@]+"${ENVS[@]}"}; do
    start+=(--env "$kv")
  done
  ssh_workers all "${start[@]}" -- "${train[@]}"
  if ((WAIT_PROGRESS > 0)); then
    note "started: every worker of $NAME logged its first progress line; follow worker 0 with: launch/tpu.sh logs --name $NAME --zone $ZONE"
  else
    note "started on every worker of $NAME (alive after 5 s; not yet progressing); follow worker 0 with: launch/tpu.sh logs --name $NAME --zone $ZONE"
  fi
}

# The TPU's state (ACTIVE / READY when usable), or "" when it is gone.
tpu_state() {
  if [[ "$USE_VM" == 1 ]]; then
    gcloud compute tpus tpu-vm describe "$NAME" "${LOC[@]}" \
      --format='value(state)' 2>/dev/null || true
  else
    gcloud compute tpus queued-resources describe "$NAME" "${LOC[@]}" \
      --format='value(state.state)' 2>/dev/null || true
  fi
}

# After a preemption (Spot, best-effort: the VMs are gone) or a maintenance
# event (the VMs restarted; the run did not): bring the TPU back if needed,
# then the same run again, which resumes from its latest checkpoint.
cmd_resume() {
  check_run_args
  local state
  if [[ "$DRY_RUN" == 1 ]]; then
    if [[ "$USE_VM" == 1 ]]; then
      print_cmd gcloud compute tpus tpu-vm describe "$NAME" "${LOC[@]}" --format='value(state)'
    else
      print_cmd gcloud compute tpus queued-resources describe "$NAME" "${LOC[@]}" --format='value(state.state)'
    fi
    note "(shown as if the TPU had been preempted: when it is ACTIVE / READY, only stage and run follow)"
    state="PREEMPTED?"
  else
    state="$(tpu_state)"
  fi
  if [[ "$state" == ACTIVE || "$state" == READY ]]; then
    note "$NAME is $state (restarted after maintenance, or the run ended): staging and starting the run again"
  else
    note "$NAME is ${state:-gone}: recreating it"
    if [[ -n "$state" ]]; then
      YES=1 cmd_delete
    fi
    WAIT=1 cmd_create
    cmd_setup
  fi
  if [[ -n "$CONFIG" ]]; then
    cmd_stage
  fi
  cmd_run
}

cmd_logs() {
  local logs=(bash "$(worker_script)" logs --log-dir "$REMOTE_LOGS"
    --lines "$LINES")
  [[ "$FOLLOW" == 0 ]] || logs+=(--follow)
  ssh_workers "$WORKER" "${logs[@]}"
}

cmd_stop() {
  ssh_workers all bash "$(worker_script)" stop --log-dir "$REMOTE_LOGS" \
    --timeout "$TIMEOUT"
}

cmd_delete() {
  local cmd
  if [[ "$USE_VM" == 1 ]]; then
    cmd=(gcloud compute tpus tpu-vm delete "$NAME" "${LOC[@]}")
  else
    cmd=(gcloud compute tpus queued-resources delete "$NAME" "${LOC[@]}" --force)
  fi
  [[ "$YES" == 0 ]] || cmd+=(--quiet)
  run "${cmd[@]}"
}

main() {
  parse_args "$@"
  validate_common
  case "$SUBCMD" in
    create) cmd_create ;;
    status) cmd_status ;;
    setup) cmd_setup ;;
    stage) cmd_stage ;;
    embed) cmd_embed ;;
    run) cmd_run ;;
    resume) cmd_resume ;;
    logs) cmd_logs ;;
    stop) cmd_stop ;;
    delete) cmd_delete ;;
  esac
}

main "$@"
