#!/usr/bin/env bash
# test_train_cli.sh - `kestrel train margin-mse` end to end on the small fixture student: the loss
# falls, the output folder keeps the sentence-transformers layout and loads back, a fixed seed
# with --no-shuffle is deterministic, and bad teacher files are refused with their line.
set -u
. tests/cli/lib.bash
F=tests/fixtures
TR=$F/train_cli/scifact_minilm_triples.tsv
train() { "$K" train margin-mse --model $F/models/st_bert_mean --teacher-scores $TR --batch-size 8 --lr 5e-3 \
            --warmup 5 --query-max-len 24 --doc-max-len 48 --dropout 0 --seed 7 --no-shuffle "$@"; }
check "train 60 steps" train --out $T/a --steps 60
# mean loss of the first and the last 10 steps, from train_log.jsonl
first=$(head -10 $T/a/train_log.jsonl | sed 's/.*"loss": \([^,]*\),.*/\1/' | awk '{s+=$1} END {print s/NR}')
last=$(tail -10 $T/a/train_log.jsonl | sed 's/.*"loss": \([^,]*\),.*/\1/' | awk '{s+=$1} END {print s/NR}')
echo "  loss: first 10 steps $first, last 10 steps $last"
check "the loss falls (last 10 steps below half the first 10)" awk -v f="$first" -v l="$last" 'BEGIN { exit !(l < f / 2) }'
check "train_log.jsonl has one line per step" test "$(wc -l < $T/a/train_log.jsonl)" = 60
check "output keeps the sentence-transformers layout" test -f $T/a/modules.json -a -f $T/a/1_Pooling/config.json -a -f $T/a/model.safetensors -a -f $T/a/vocab.txt
check "the student loads and embeds" sh -c "echo 'stem cells' | '$K' embed --model $T/a --out $T/a.npy"
check "the student's vectors moved" sh -c "echo 'stem cells' | '$K' embed --model $F/models/st_bert_mean --out $T/init.npy && ! cmp -s $T/a.npy $T/init.npy"
check "same seed, --no-shuffle: identical weights" sh -c "$(declare -f train); K='$K' F='$F' TR='$TR'; train --out $T/b --steps 60 && cmp $T/a/model.safetensors $T/b/model.safetensors"
check "sgd with cosine schedule and clipping runs" train --out $T/c --steps 5 --optimizer sgd --schedule cosine --grad-clip 1.0
check "--help" sh -c "'$K' train --help | grep -q 'margin-mse'"
check "--device expects cpu or cuda" sh -c "'$K' train margin-mse --device tpu --model x --out y --teacher-scores z 2>&1 | grep -q 'expects cpu or cuda'"
# --device cuda where this build or machine has no GPU: a clear error, nothing written
if ! command -v nvidia-smi >/dev/null 2>&1; then
  check "--device cuda without a GPU: says what to do, writes nothing" \
    sh -c "$(declare -f train); K='$K' F='$F' TR='$TR'; ! train --out $T/g --steps 1 --device cuda 2>$T/g.err && grep -q 'device cuda' $T/g.err && grep -q -- '--device cpu' $T/g.err && test ! -e $T/g"
fi
# resuming: shuffle and dropout on; 10 steps of 8 cross the 48-line file's end (a new epoch)
resumable() { "$K" train margin-mse --model $F/models/st_bert_mean --teacher-scores $TR --batch-size 8 --lr 5e-3 \
            --warmup 3 --query-max-len 24 --doc-max-len 48 --dropout 0.1 --seed 11 --steps 10 "$@"; }
check "uninterrupted run (shuffle, dropout 0.1)" resumable --out $T/r0
check "stopped after step 5 (state every 3 steps)" resumable --out $T/r1 --save-every 3 --stop-after 5
check "the stopped run left a state" test -f $T/r1/train_state.bin
check "resumed to step 10" resumable --out $T/r1 --save-every 3 --resume $T/r1
check "resume equals uninterrupted training: identical weights" cmp $T/r0/model.safetensors $T/r1/model.safetensors
check "resumed log equals the uninterrupted one (but speed)" diff <(sed 's/, "triples_per_s.*//' $T/r0/train_log.jsonl) <(sed 's/, "triples_per_s.*//' $T/r1/train_log.jsonl)
KESTREL_TEST_KILL=mid_state_save:2 resumable --out $T/r2 --save-every 3 >/dev/null 2>&1; rc=$?
check "kill -9 in the middle of the second state save (step 6)" test "$rc" = 137
check "the temporary of the interrupted save is there, the state is the previous one" sh -c "test -f $T/r2/train_state.bin.tmp && grep -a -q '\"step\":.3,' $T/r2/train_state.bin"
check "resume after kill -9 from the step-3 state" resumable --out $T/r2 --save-every 3 --resume $T/r2
check "resume after kill -9 equals uninterrupted training" cmp $T/r0/model.safetensors $T/r2/model.safetensors
check "resume into another folder" resumable --out $T/r3 --save-every 3 --resume $T/r1
check "resume into another folder keeps the weights" cmp $T/r0/model.safetensors $T/r3/model.safetensors
expect_exit "a fresh run refuses an OUT_DIR holding a state" 1 "--resume" -- resumable --out $T/r1 --save-every 3
expect_exit "resume with other options is refused, naming the option" 1 "--lr is 0.001" -- resumable --out $T/r1 --resume $T/r1 --lr 1e-3
expect_exit "resume from a folder without a state" 5 "no training state" -- resumable --out $T/r4 --resume $T/r0
# evaluation during training: before the first step it must equal sentence-transformers +
# pytrec_eval on the same slice (tests/fixtures/fx_train_eval.py -> train_eval/expected.json)
E=$F/train_eval
evtrain() { "$K" train margin-mse --model $F/models/st_bert_mean --teacher-scores $TR --batch-size 8 --lr 5e-3 --seed 7 "$@"; }
check "train with --eval-every 5" evtrain --out $T/ev --steps 10 --eval-queries $E/queries.tsv --eval-qrels $E/qrels.trec --eval-collection $E/corpus.jsonl --eval-every 5
cp $T/out.log $T/ev.log
want_nd=$(sed -n 's/.*"ndcg@10": \([^,]*\),.*/\1/p' $E/expected.json); want_mrr=$(sed -n 's/.*"mrr@10": \([^,]*\),.*/\1/p' $E/expected.json)
got_nd=$(grep '"step": 0, "eval' $T/ev/train_log.jsonl | sed 's/.*"eval_ndcg@10": \([^,]*\),.*/\1/')
got_mrr=$(grep '"step": 0, "eval' $T/ev/train_log.jsonl | sed 's/.*"eval_mrr@10": \([^,]*\),.*/\1/')
echo "  eval before training: nDCG@10 $got_nd (sentence-transformers + pytrec_eval: $want_nd), MRR@10 $got_mrr ($want_mrr)"
check "eval before training: nDCG@10 equals the reference (1e-5)" awk -v a="$got_nd" -v b="$want_nd" 'BEGIN { d = a - b; exit !(a != "" && d < 1e-5 && d > -1e-5) }'
check "eval before training: MRR@10 equals the reference (1e-5)" awk -v a="$got_mrr" -v b="$want_mrr" 'BEGIN { d = a - b; exit !(a != "" && d < 1e-5 && d > -1e-5) }'
check "eval logged at steps 0, 5 and 10" test "$(grep -c '"eval_ndcg@10"' $T/ev/train_log.jsonl)" = 3
check "eval shown on stderr" grep -q "eval at step 5: nDCG@10" $T/ev.log
check "ColBERT student with eval" "$K" train margin-mse --model $F/models/colbert --teacher-scores $TR --out $T/evc --steps 1 --batch-size 4 --eval-queries $E/queries.tsv --eval-qrels $E/qrels.trec --eval-collection $E/corpus.jsonl
cwant=$(sed -n 's/.*"ndcg@10": \([^,]*\),.*/\1/p' $E/expected_colbert.json)
cgot=$(grep '"step": 0, "eval' $T/evc/train_log.jsonl | sed 's/.*"eval_ndcg@10": \([^,]*\),.*/\1/')
echo "  ColBERT eval before training: nDCG@10 $cgot (colbert-ai + pytrec_eval: $cwant)"
check "ColBERT eval before training: nDCG@10 equals colbert-ai's (1e-5)" awk -v a="$cgot" -v b="$cwant" 'BEGIN { d = a - b; exit !(a != "" && d < 1e-5 && d > -1e-5) }'
expect_exit "eval without a corpus" 1 "--eval-collection" -- train --out $T/x --steps 1 --eval-queries $E/queries.tsv --eval-qrels $E/qrels.trec
check "eval without a corpus: nothing written" test ! -e $T/x
expect_exit "eval qrels that judge none of the queries" 1 "no query has a judgment" -- train --out $T/x --steps 1 --eval-queries $E/queries.tsv --eval-qrels $F/eval/cases.qrels --eval-collection $E/corpus.jsonl
check "bad eval qrels: nothing written" test ! -e $T/x

# bad teacher files: exit 3, the file and line named, and nothing written (OUT_DIR not created)
FX=$F/train
bad_teacher() { # NAME NEEDLE FILE [options...]
  local name=$1 needle=$2 file=$3; shift 3
  expect_exit "$name" 3 "$needle" -- "$K" train margin-mse --model $F/models/st_bert_mean --teacher-scores "$file" --out $T/x --steps 1 "$@"
  check "$name: nothing written to OUT_DIR" test ! -e $T/x
}
printf '0.5\t0.1\tquery\tpos\n' > $T/bad1.tsv
bad_teacher "teacher line with a missing column" "bad1.tsv: line 1" $T/bad1.tsv
printf 'nan\t0.1\tquery\tpos\tneg\n' > $T/bad2.tsv
bad_teacher "NaN teacher score" "bad2.tsv: line 1" $T/bad2.tsv
: > $T/empty.tsv
bad_teacher "empty teacher file" "empty.tsv: has no training rows" $T/empty.tsv
printf '1.5\t0.2\tq999\t101\t102\n' > $T/badq.tsv
bad_teacher "unknown qid" "unknown qid \"q999\"" $T/badq.tsv --queries $FX/queries.tsv --collection $FX/collection.tsv
printf '1.5\t0.2\tq1\t101\t7777\n' > $T/badp.tsv
bad_teacher "unknown pid" "unknown pid \"7777\"" $T/badp.tsv --queries $FX/queries.tsv --collection $FX/collection.tsv
# a bad line far down the file (after 40 good ones), file order: still refused before training
{ head -40 $TR; printf '0.5\tinf\tquery\tpos\tneg\n'; tail -8 $TR; } > $T/late.tsv
bad_teacher "bad score on line 41 of 49, --no-shuffle" "late.tsv: line 41" $T/late.tsv --no-shuffle --batch-size 8
{ head -20 $TR; printf '0.5\t0.1\tquery\tpos\n'; } > $T/late2.tsv
bad_teacher "missing column on the last line, shuffled" "late2.tsv: line 21" $T/late2.tsv --batch-size 4
expect_exit "a cross-encoder is not a margin-mse student" 1 "cross-encoder" -- "$K" train margin-mse --model $F/models/cross_bert --teacher-scores $TR --out $T/x --steps 1
expect_exit "missing --out" 64 "required" -- "$K" train margin-mse --model $F/models/st_bert_mean --teacher-scores $TR
summary "train cli"
