#!/usr/bin/env bash
# run_tests.sh - runs every test binary in BUILD/tests and the CLI tests, then one summary line.
# KESTREL_SKIP_REAL=1 skips fetching the real pre-trained checkpoints (the sanitizer run does,
# to stay fast; the tests that need them then skip with that reason).
set -u
build=${1:-build}
pass=0; fail=0; failed=""
export KESTREL_NO_PROGRESS=1
export KESTREL="$build/kestrel"
if [ -z "${KESTREL_SKIP_REAL:-}" ]; then
  while IFS='=' read -r k v; do
    case "$k" in MINILM|BGE) export "KESTREL_$k=$v" ;; esac
  done < <(tests/fetch_models.sh)
fi
for t in "$build"/tests/test_*; do
  [ -x "$t" ] || continue
  echo "== $(basename "$t")"
  if "$t"; then pass=$((pass+1)); else fail=$((fail+1)); failed="$failed $(basename "$t")"; fi
done
for s in tests/cli/*.sh; do
  [ -f "$s" ] || continue
  echo "== $(basename "$s")"
  if bash "$s" "$build/kestrel"; then pass=$((pass+1)); else fail=$((fail+1)); failed="$failed $(basename "$s")"; fi
done
[ -n "$failed" ] && echo "failed suites:$failed"
echo "suites: $pass passed, $fail failed"
[ "$fail" = 0 ]
