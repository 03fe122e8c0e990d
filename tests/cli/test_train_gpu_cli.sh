#!/usr/bin/env bash
# test_train_gpu_cli.sh - `kestrel train margin-mse --device cuda` on a ColBERT student and with
# --in-batch-weight: on a CUDA=1 build with a GPU both train (the loss falls over 20 steps, the
# folder loads back as a ColBERT model and encodes); elsewhere they fail with exit 6, say why and
# what to do (--device cpu), and write nothing. Either way the old refusals ("ColBERT students
# train on the CPU only", "--in-batch-weight is not implemented on the GPU") are gone.
set -u
. tests/cli/lib.bash
F=tests/fixtures
TR=$F/train_cli/scifact_minilm_triples.tsv
train() { "$K" train margin-mse --teacher-scores $TR --batch-size 8 --lr 3e-3 --dropout 0 --seed 7 --no-shuffle \
            --device cuda "$@"; }
for kind in colbert inbatch; do
  if [ $kind = colbert ]; then args="--model $F/models/colbert"; else args="--model $F/models/st_bert_mean --in-batch-weight 0.5"; fi
  train $args --out $T/$kind --steps 20 >"$T/$kind.out" 2>"$T/$kind.err"; rc=$?
  if grep -q -e "CPU only" -e "not implemented on the GPU" "$T/$kind.err"; then bad "$kind: the old refusal is back: $(head -c 300 "$T/$kind.err")"
  else ok "$kind: no refusal"; fi
  if [ $rc = 0 ]; then
    ok "$kind: trained on the GPU"
    first=$(head -5 $T/$kind/train_log.jsonl | sed 's/.*"loss": \([^,]*\),.*/\1/' | awk '{s+=$1} END {print s/NR}')
    last=$(tail -5 $T/$kind/train_log.jsonl | sed 's/.*"loss": \([^,]*\),.*/\1/' | awk '{s+=$1} END {print s/NR}')
    echo "  $kind: loss first 5 steps $first, last 5 steps $last"
    check "$kind: the loss falls" awk -v f="$first" -v l="$last" 'BEGIN { exit !(l < f) }'
    check "$kind: the student loads and encodes" sh -c "echo 'stem cells' | '$K' embed --model $T/$kind --out $T/$kind.npy"
  else
    if [ $rc = 6 ] && grep -qF "device cuda" "$T/$kind.err" && grep -qF -- "--device cpu" "$T/$kind.err"; then
      ok "$kind: without a GPU: exit 6, says why and what to do"
    else bad "$kind: --device cuda (exit $rc; stderr: $(head -c 300 "$T/$kind.err"))"; fi
    check "$kind: nothing written" test ! -e $T/$kind
  fi
done
check "--help says ColBERT students train on the GPU" sh -c "'$K' train --help | grep -q 'ColBERT students too'"
summary "train --device cuda (ColBERT, in-batch)"
