#!/usr/bin/env bash
# run_tests.sh - runs every test binary in BUILD/tests (and the CLI tests), then one summary line.
set -u
build=${1:-build}
pass=0; fail=0; failed=""
export KESTREL_NO_PROGRESS=1
for t in "$build"/tests/test_*; do
  [ -x "$t" ] || continue
  echo "== $(basename "$t")"
  if "$t"; then pass=$((pass+1)); else fail=$((fail+1)); failed="$failed $(basename "$t")"; fi
done
for s in tests/cli/*.sh; do
  [ -f "$s" ] || continue
  [ -n "${KESTREL_SKIP_CLI:-}" ] && break
  echo "== $(basename "$s")"
  if bash "$s" "$build/kestrel"; then pass=$((pass+1)); else fail=$((fail+1)); failed="$failed $(basename "$s")"; fi
done
[ -n "$failed" ] && echo "failed:$failed"
echo "suites: $pass passed, $fail failed"
[ "$fail" = 0 ]
