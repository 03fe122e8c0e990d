#!/usr/bin/env bash
# test_readme_example.sh - compiles the C example in README.md (between the example markers)
# against the library and runs it: the README's example must keep working.
set -eu
K=${1:-build/kestrel}
B=$(dirname "$K")
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
sed -n '/<!-- example:begin -->/,/<!-- example:end -->/p' README.md | sed '1,2d;$d' | sed '$d' > "$T/example.c"
grep -q "int main" "$T/example.c" || { echo "no example found in README.md"; exit 1; }
# The libraries (and sanitizer flags) of the build under test, from the Makefile.
libs=${KST_LDLIBS:-$(make -s --no-print-directory print-LDLIBS)}
cc -std=c11 ${KST_CFLAGS:-} -I. -o "$T/example" "$T/example.c" "$B/libkestrel.a" $libs
out=$("$T/example" "$T/ix")
echo "$out"
[ "$(echo "$out" | wc -l)" = 3 ] || { echo "expected 3 hits"; exit 1; }
echo "readme example: 1 passed, 0 failed"
