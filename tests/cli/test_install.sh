#!/usr/bin/env bash
# test_install.sh - `make install` into a staging folder: the installed kestrel.h stands alone,
# pkg-config finds the library, and the README example builds against the installed copy only.
set -eu
K=${1:-build/kestrel}
B=$(dirname "$K")
if [ -n "${KST_CFLAGS:-}" ]; then
  echo "install: skipped in the sanitizer build (it installs the regular build)"; echo "install: 0 passed, 0 failed"; exit 0
fi
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
make -s --no-print-directory install BUILD="$B" DESTDIR="$T" PREFIX=/usr >/dev/null
sed -n '/<!-- example:begin -->/,/<!-- example:end -->/p' README.md | sed '1,2d;$d' | sed '$d' |
  sed 's|#include "api/kestrel.h"|#include <kestrel.h>|' > "$T/example.c"
export PKG_CONFIG_PATH="$T/usr/lib/pkgconfig" PKG_CONFIG_SYSROOT_DIR="$T"
cc -std=c11 -Wall -Werror $(pkg-config --cflags kestrel) -o "$T/example" "$T/example.c" $(pkg-config --libs kestrel)
LD_LIBRARY_PATH="$T/usr/lib" "$T/example" "$T/ix" | wc -l | grep -qx 3
"$T/usr/bin/kestrel" --version | grep -q "^kestrel $(pkg-config --modversion kestrel)"
echo "install: 1 passed, 0 failed"
