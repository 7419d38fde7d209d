# shellcheck shell=bash
# Helpers shared by the launch scripts: errors, quoting, dry-run execution
# and flag checks. Sourced, never executed. Kept compatible with bash 3.2
# (the macOS /bin/bash), since tpu.sh runs on laptops: no mapfile, no
# associative arrays, and empty arrays are expanded as ${a[@]+"${a[@]}"}.

LAUNCH_PROG="${LAUNCH_PROG:-$(basename "$0")}"
DRY_RUN=0

# Prints a one-line error to stderr and exits 2 (a usage error).
die() {
  printf '%s: error: %s\n' "$LAUNCH_PROG" "$*" >&2
  exit 2
}

# Prints a one-line error to stderr and exits 1 (a failure at run time).
fail() {
  printf '%s: error: %s\n' "$LAUNCH_PROG" "$*" >&2
  exit 1
}

# Prints an informational line to stderr (stdout carries commands only).
note() {
  printf '%s: %s\n' "$LAUNCH_PROG" "$*" >&2
}

_SHQUOTE_SAFE='^[A-Za-z0-9_./:=@%+,-]+$'
_SHQUOTE_FLAG='^(--[A-Za-z0-9][A-Za-z0-9._-]*=)(.*)$'

# Single-quotes one word for a POSIX shell, only when it needs it.
_shquote_word() {
  local s="$1" q="'\\''"
  if [[ "$s" =~ $_SHQUOTE_SAFE ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//\'/$q}"
  fi
}

# Quotes one argument; for --flag=value only the value part is quoted, so
# printed commands stay readable (--command='cd x && y').
shquote() {
  local s="$1"
  if [[ ! "$s" =~ $_SHQUOTE_SAFE && "$s" =~ $_SHQUOTE_FLAG ]]; then
    printf '%s' "${BASH_REMATCH[1]}"
    _shquote_word "${BASH_REMATCH[2]}"
  else
    _shquote_word "$s"
  fi
}

# Joins the arguments into one shell-safe command line.
join_quoted() {
  local out="" a
  for a in "$@"; do
    out="${out:+$out }$(shquote "$a")"
  done
  printf '%s' "$out"
}

# Prints a command the way it would run: '+ cmd args...' on stdout.
print_cmd() {
  printf '+ %s\n' "$(join_quoted "$@")"
}

# Runs a command, or prints it under --dry-run.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    print_cmd "$@"
  else
    "$@"
  fi
}

# need_value FLAG NUM_ARGS_LEFT [VALUE]: dies unless FLAG got a value.
need_value() {
  if (($2 < 2)) || [[ -z "${3-}" || "$3" == --* ]]; then
    die "$1 needs a value"
  fi
}

# need_env_assignment VALUE: dies unless VALUE reads KEY=VALUE.
need_env_assignment() {
  [[ "$1" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] ||
    die "--env needs KEY=VALUE, got '$1'"
}

# need_int FLAG VALUE: dies unless VALUE is a positive integer.
need_int() {
  [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive integer, got '$2'"
}

# Dies unless an override looks like --config.key=value.
check_override() {
  [[ "$1" =~ ^--config\.[A-Za-z_][A-Za-z0-9_.]*=.* ]] ||
    die "config override '$1' must read --config.key=value"
}

# Dies unless VALUE looks like a config file: path/to/file.py[:arg].
check_config_path() {
  [[ "$1" =~ \.py(:.*)?$ ]] ||
    die "--config must be a python config file (configs/<run>.py[:arg]), got '$1'"
}

# Splits --flag=value into two words (except --config.* overrides, which the
# program parses itself); the result is in the array NORMALIZED_ARGS.
normalize_args() {
  NORMALIZED_ARGS=()
  local a passthrough=0
  for a in "$@"; do
    if [[ "$passthrough" == 1 ]]; then
      NORMALIZED_ARGS+=("$a")
      continue
    fi
    case "$a" in
      --) passthrough=1 && NORMALIZED_ARGS+=("$a") ;;
      --config.*) NORMALIZED_ARGS+=("$a") ;;
      --*=*) NORMALIZED_ARGS+=("${a%%=*}" "${a#*=}") ;;
      *) NORMALIZED_ARGS+=("$a") ;;
    esac
  done
}
