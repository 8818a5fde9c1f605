# Helpers shared by the launch scripts. Sourced, not executed.
#
# Every external command goes through `run`, so `--dry-run` prints exactly the commands a real run
# would execute (one per line on stdout, quoted so they can be pasted into a shell); progress
# messages go to stderr so that stdout stays a clean list of commands.

DRY_RUN=0
OVERRIDES=()  # --config.<field>=<value> arguments, passed through to fnc_jax.main unchanged

die() {
  echo "$(basename "$0"): error: $*" >&2
  echo "Run '$0 --help' for usage." >&2
  exit 2
}

log() { echo "[$(basename "$0")] $*" >&2; }

# Quote a word for the shell only when it needs it (plain words stay readable).
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf '%s' "${1@Q}"
  fi
}

# All arguments as one shell command line.
shell_join() {
  local out="" word
  for word in "$@"; do
    out+="${out:+ }$(quote "$word")"
  done
  printf '%s\n' "$out"
}

run() {
  if ((DRY_RUN)); then
    shell_join "$@"
  else
    "$@"
  fi
}

# require VALUE FLAG: fail with a message naming FLAG when VALUE is empty.
require() {
  [[ -n $1 ]] || die "missing required argument $2"
}

# need_value FLAG "$@": the flag's value must follow it.
need_value() {
  [[ $# -ge 2 && $2 != --* ]] || die "$1 needs a value"
}
