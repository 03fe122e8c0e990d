#!/usr/bin/env bash
# test_train_vq_gpu_cli.sh - `kestrel train vq --device cuda`: on a CUDA=1 build with a GPU it
# writes a new generation whose manifest records the device, search works on it, and its losses
# end close to the same run on the CPU (--device cpu, same seed, from a copy of the same index);
# elsewhere it fails with exit 6, says why and what to do (--device cpu), and the index keeps its
# generation. Either way: --anchor with --device cuda is refused by name (exit 6), a bad device
# is a usage error (exit 64).
set -u
. tests/cli/lib.bash
F=tests/fixtures/models
head -300 ../shared/data/beir-scifact/corpus.jsonl > $T/corpus.jsonl
# the manifest, with the sqlite3 shell (make deps installs it) or else Python's sqlite3 (GPU hosts)
manifest() {
  if command -v sqlite3 >/dev/null; then sqlite3 -readonly "$1/docs.sqlite" "SELECT value FROM manifest WHERE key = '$2'" 2>/dev/null
  else python3 -c 'import sqlite3, sys; r = sqlite3.connect(sys.argv[1]).execute("SELECT value FROM manifest WHERE key = ?", (sys.argv[2],)).fetchone(); print(r[0] if r else "")' "$1/docs.sqlite" "$2"; fi
}
# "loss ivf A -> B, pq C -> D" of the summary line: B D
losses() { sed -n 's/.*loss ivf [0-9.]* -> \([0-9.]*\), pq [0-9.]* -> \([0-9.]*\);.*/\1 \2/p' "$1"; }

check "index build (IVF4,PQ4)" "$K" index build --index $T/ix --collection $T/corpus.jsonl --model $F/st_bert_mean --factory 'IVF4,PQ4'
cp -r $T/ix $T/ixc
gen0=$(manifest $T/ix ann_file)
args="--epochs 2 --candidates 50 --seed 3 --val-fraction 0"
"$K" train vq --index $T/ix $args --device cuda >$T/gpu.out 2>$T/gpu.err; rc=$?
if [ $rc = 0 ]; then
  ok "trained on the GPU"
  gen1=$(manifest $T/ix ann_file)
  [ "$gen1" != "$gen0" ] && ok "a new generation: $gen0 -> $gen1" || bad "no new generation"
  case "$(manifest $T/ix vq_training)" in *'"device":"cuda"'*) ok "the manifest records device cuda" ;;
    *) bad "the manifest lacks device cuda: $(manifest $T/ix vq_training)" ;; esac
  check "search on the GPU-trained index" sh -c "'$K' search --index $T/ix --query 'vitamin D deficiency' --stages dense -k 10 --format tsv | grep -q ."
  "$K" train vq --index $T/ixc $args --device cpu >/dev/null 2>$T/cpu.err && ok "the same run on the CPU" ||
    bad "the same run on the CPU: $(head -c 300 $T/cpu.err)"
  case "$(manifest $T/ixc vq_training)" in *'"device":"cpu"'*) ok "the CPU run records device cpu" ;;
    *) bad "the CPU run's manifest: $(manifest $T/ixc vq_training)" ;; esac
  g=$(losses $T/gpu.err); c=$(losses $T/cpu.err)
  echo "  final losses (ivf pq): gpu $g, cpu $c"
  check "final losses within 2% of the CPU's" awk -v g="$g" -v c="$c" 'BEGIN { split(g, a, " "); split(c, b, " ");
    exit !(a[1] != "" && b[1] != "" && (a[1] - b[1])^2 <= (0.02 * b[1])^2 && (a[2] - b[2])^2 <= (0.02 * b[2])^2) }'
else
  if [ $rc = 6 ] && grep -qF "device cuda" $T/gpu.err && grep -qF -- "--device cpu" $T/gpu.err; then
    ok "without a GPU: exit 6, says why and what to do"
  else bad "--device cuda (exit $rc; stderr: $(head -c 300 $T/gpu.err))"; fi
  [ "$(manifest $T/ix ann_file)" = "$gen0" ] && ok "the index keeps $gen0" || bad "the generation moved"
fi
"$K" train vq --index $T/ixc --device cuda --anchor 1 >/dev/null 2>$T/anchor.err; rc=$?
[ $rc = 6 ] && grep -qF -- "--anchor" $T/anchor.err && ok "--anchor with --device cuda: exit 6, named" ||
  bad "--anchor with --device cuda (exit $rc: $(head -c 300 $T/anchor.err))"
"$K" train vq --index $T/ixc --device tpu >/dev/null 2>$T/bad.err; rc=$?
[ $rc = 64 ] && ok "--device tpu: usage error" || bad "--device tpu (exit $rc)"
check "--help names --device" sh -c "'$K' train vq --help | grep -q -- '--device cpu|cuda'"
summary "train vq --device cuda"
