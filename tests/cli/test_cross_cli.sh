#!/usr/bin/env bash
# test_cross_cli.sh - `kestrel train cross` end to end on the small fixture cross-encoder, with
# pairs, triples and teacher scores built from the SciFact training triples: the loss falls, the
# output keeps the transformers layout and scores in Kestrel, --no-shuffle means the first batch is
# the first lines, and bad input is refused with its line.
set -u
. tests/cli/lib.bash
F=tests/fixtures
TR=$F/train_cli/scifact_minilm_triples.tsv
M=$F/models/cross_bert
awk -F'\t' '{print $3"\t"$4"\t1"; print $3"\t"$5"\t0"}' $TR > $T/pairs.tsv
cut -f3- $TR > $T/triples.tsv
tc() { "$K" train cross --model $M --batch-size 8 --lr 2e-3 --max-len 64 --dropout 0 --seed 3 "$@"; }
loss_drop() { # DIR: mean loss of the last 10 steps below half of the first 10
  local f l
  f=$(head -10 $1/train_log.jsonl | sed 's/.*"loss": \([^,]*\),.*/\1/' | awk '{s+=$1} END {print s/NR}')
  l=$(tail -10 $1/train_log.jsonl | sed 's/.*"loss": \([^,]*\),.*/\1/' | awk '{s+=$1} END {print s/NR}')
  echo "  $1: loss first 10 steps $f, last 10 steps $l"
  awk -v f="$f" -v l="$l" 'BEGIN { exit !(l < f / 2) }'
}
check "train on triples (CE), 40 steps" tc --triples $T/triples.tsv --out $T/tri --steps 40
check "triples: the loss falls" loss_drop $T/tri
check "train on teacher scores (Margin-MSE), 30 steps" tc --teacher-scores $TR --out $T/mm --steps 30
check "teacher scores: the loss falls" loss_drop $T/mm
check "train on labelled pairs (BCE), 2 epochs" tc --pairs $T/pairs.tsv --out $T/bce --epochs 2 --lr 5e-3
check "pairs: 2 epochs of 96 pairs in batches of 8 is 24 steps" test "$(wc -l < $T/bce/train_log.jsonl)" = 24
check "teacher scores with --loss mse" tc --teacher-scores $TR --out $T/mse --steps 3 --loss mse
check "the output keeps the transformers layout" test -f $T/tri/config.json -a -f $T/tri/model.safetensors -a -f $T/tri/vocab.txt -a -f $T/tri/tokenizer_config.json
check "the trained model scores in Kestrel, and its scores moved" sh -c "head -4 $T/pairs.tsv | cut -f1,2 > $T/p.tsv && '$K' score --model $T/tri --pairs $T/p.tsv > $T/s1 && '$K' score --model $M --pairs $T/p.tsv > $T/s0 && ! cmp -s $T/s0 $T/s1"
# --no-shuffle: step 1 sees the first --batch-size lines, so one step on the whole file and on
# only its first 8 lines give the same weights.
head -8 $T/triples.tsv > $T/first8.tsv
check "--no-shuffle: the first batch is the first 8 lines" sh -c "$(declare -f tc); K='$K' M='$M'; tc --triples $T/triples.tsv --out $T/n1 --steps 1 --no-shuffle && tc --triples $T/first8.tsv --out $T/n2 --steps 1 --no-shuffle && cmp $T/n1/model.safetensors $T/n2/model.safetensors"
check "shuffled, same seed: identical weights" sh -c "$(declare -f tc); K='$K' M='$M'; tc --triples $T/triples.tsv --out $T/r1 --steps 3 && tc --triples $T/triples.tsv --out $T/r2 --steps 3 && cmp $T/r1/model.safetensors $T/r2/model.safetensors"
check "shuffled: the first batch is not the first lines" sh -c "! cmp -s $T/n1/model.safetensors $T/r1/model.safetensors"
check "--help" sh -c "'$K' train cross --help | grep -q 'binary cross-entropy'"
printf 'q\tp\t1\nq\tp\n' > $T/bad1.tsv
expect_exit "pairs line with a missing column" 3 "line 2: 2 columns" -- "$K" train cross --model $M --pairs $T/bad1.tsv --out $T/x
printf 'q\tp\t2\n' > $T/bad2.tsv
expect_exit "label outside [0, 1]" 3 "is not a number in [0, 1]" -- "$K" train cross --model $M --pairs $T/bad2.tsv --out $T/x
: > $T/empty.tsv
expect_exit "empty triples file" 3 "has no training rows" -- "$K" train cross --model $M --triples $T/empty.tsv --out $T/x
check "nothing written on failure" test ! -e $T/x
expect_exit "a dense model is not a cross-encoder" 1 "not a cross-encoder" -- "$K" train cross --model $F/models/st_bert_mean --triples $T/triples.tsv --out $T/x
expect_exit "two logits are refused" 6 "num_labels is 2" -- "$K" train cross --model $F/models/cross_distilbert --triples $T/triples.tsv --out $T/x
expect_exit "two data files" 64 "exactly one" -- "$K" train cross --model $M --triples $T/triples.tsv --pairs $T/pairs.tsv --out $T/x
expect_exit "--loss without teacher scores" 64 "--loss applies" -- "$K" train cross --model $M --triples $T/triples.tsv --loss mse --out $T/x
summary "train cross cli"
