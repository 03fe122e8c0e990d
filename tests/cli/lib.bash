# lib.bash - helpers the CLI test scripts share (sourced, not run: run_tests.sh runs *.sh only).
# Sourced first: K is the kestrel binary (the script's first argument), T a temporary folder
# removed on exit (a script that must also stop servers sets its own trap, removing T too), and
# progress bars are off. Each script prints its summary with `summary`.
K=${1:-build/kestrel}
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
export KESTREL_NO_PROGRESS=1
pass=0; fail=0

ok()  { pass=$((pass+1)); echo "  ok   $1"; }
bad() { fail=$((fail+1)); echo "  FAIL $1"; }
# check NAME command...: passes when the command succeeds; shows its output when not
check() {
  local name=$1; shift
  if "$@" >"$T/out.log" 2>&1; then ok "$name"; else bad "$name"; sed 's/^/       /' "$T/out.log" | head -20; fi
}
# expect_exit NAME CODE NEEDLE -- command...: the exit code, and NEEDLE in what it printed on stderr
expect_exit() {
  local name=$1 code=$2 needle=$3; shift 4
  "$@" >"$T/o" 2>"$T/e"; local rc=$?
  if [ "$rc" = "$code" ] && grep -qF -- "$needle" "$T/e"; then ok "$name"
  else bad "$name (exit $rc, want $code; stderr: $(head -c 300 "$T/e"))"; fi
}
# summary LABEL: the closing "N passed, N failed" line and the exit status
summary() {
  echo "$1: $pass passed, $fail failed"
  [ "$fail" = 0 ]
}
