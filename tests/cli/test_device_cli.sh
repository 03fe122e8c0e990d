#!/usr/bin/env bash
# test_device_cli.sh - `--device`: cpu is the default and gives the same vectors; cuda either
# works (a CUDA=1 build on a machine with a GPU: vectors within bf16 rounding of the CPU's) or
# fails with exit code 6 and a message saying why and what to do; a bad value is a usage error.
set -u
. tests/cli/lib.bash
F=tests/fixtures/models
M=$F/st_bert_mean
cp $M/kestrel_ref/texts.txt $T/texts.txt
check "embed --device cpu" sh -c "'$K' embed --model $M --out $T/cpu.npy --device cpu < $T/texts.txt"
check "the same as without --device" sh -c "'$K' embed --model $M --out $T/def.npy < $T/texts.txt && cmp $T/cpu.npy $T/def.npy"
"$K" embed --model $M --out $T/gpu.npy --device cuda < $T/texts.txt >"$T/o" 2>"$T/e"; rc=$?
if [ $rc = 0 ]; then
  ok "embed --device cuda ran on the GPU"
  check "GPU vectors within cosine 0.999 of the CPU's" python3 - "$T/cpu.npy" "$T/gpu.npy" <<'PY'
import struct, sys, math
def load(p):
    b = open(p, "rb").read(); hl = struct.unpack("<H", b[8:10])[0]; h = b[10:10 + hl].decode()
    shape = tuple(int(x) for x in h.split("(")[1].split(")")[0].split(",") if x.strip())
    return shape, struct.unpack("<%df" % (shape[0] * shape[1]), b[10 + hl:])
(n, d), a = load(sys.argv[1]); _, g = load(sys.argv[2])
for i in range(n):
    x, y = a[i * d:(i + 1) * d], g[i * d:(i + 1) * d]
    c = sum(p * q for p, q in zip(x, y)) / math.sqrt(sum(p * p for p in x) * sum(q * q for q in y))
    assert c >= 0.999, (i, c)
PY
else
  if [ $rc = 6 ] && grep -qF "device cuda" "$T/e"; then ok "embed --device cuda without a GPU: exit 6, says why"
  else bad "embed --device cuda (exit $rc; stderr: $(head -c 300 "$T/e"))"; fi
  check "no output file after the failure" test ! -e $T/gpu.npy
fi
expect_exit "--device tpu is a usage error" 64 "expects cpu or cuda" -- "$K" embed --model $M --out $T/x.npy --device tpu
expect_exit "search --device tpu is a usage error" 64 "expects cpu or cuda" -- "$K" search --index $T/none --query q --device tpu
check "--help names --device" sh -c "'$K' embed --help | grep -q -- '--device'"
summary "device cli"
