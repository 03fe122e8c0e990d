#!/usr/bin/env bash
# test_selfdistill_cli.sh - `kestrel train self-distill` on the fixture models: the cycle-0 dev
# nDCG@10 equals pytrec_eval's (fx_teach.py), every stage is logged, the chosen cycle is saved in
# the sources' layouts and loads back, mutual distillation (several --bi / --cross, A||B) runs,
# and bad input is refused.
set -u
. tests/cli/lib.bash
F=tests/fixtures
D=$F/teach
awk -F'\t' 'NR <= 16 {print $3"\t"$4; print $3"\t"$5}' $F/train_cli/scifact_minilm_triples.tsv > $T/pairs.tsv
awk -F'\t' '{print $1"||"$2}' $T/pairs.tsv > $T/pairs_bars.txt
DEV="--dev-queries $D/queries.tsv --dev-qrels $D/qrels.txt --dev-collection $D/collection.tsv"
sd() { "$K" train self-distill --batch-size 8 --lr 1e-3 --max-len 48 --seed 5 "$@"; }
check "one bi, one cross, 2 cycles, dev set" sd --bi $F/models/st_bert_mean --cross $F/models/cross_bert --pairs $T/pairs.tsv --out $T/a --cycles 2 $DEV
want=$(cat $D/ndcg10_st_bert_mean.txt)
got=$(sed -n 's/.*"cycle": 0, "stage": "dev", "nDCG@10": \([0-9.]*\).*/\1/p' $T/a/self_distill_log.jsonl)
echo "  cycle 0 nDCG@10: kestrel $got, pytrec_eval $want"
check "cycle 0 nDCG@10 = pytrec_eval's (1e-4)" awk -v a="$got" -v b="$want" 'BEGIN { d = a - b; exit !(a != "" && d < 1e-4 && d > -1e-4) }'
check "every stage of both cycles is logged" test "$(grep -c '"cycle": [12]' $T/a/self_distill_log.jsonl)" = 10
check "the bi-encoder keeps the sentence-transformers layout and embeds" sh -c "test -f $T/a/bi/modules.json && echo 'stem cells' | '$K' embed --model $T/a/bi --out $T/v.npy"
check "the cross-encoder keeps the transformers layout and scores" sh -c "printf 'a\tb\n' | '$K' score --model $T/a/cross --pairs -"
check "the bi-encoder moved" sh -c "echo 'stem cells' | '$K' embed --model $F/models/st_bert_mean --out $T/v0.npy && ! cmp -s $T/v.npy $T/v0.npy"
check "mutual: --bi A||B --cross C --cross D, a||b pairs, no dev set" sd --bi "$F/models/st_bert_mean||$F/models/st_distilbert_max" --cross $F/models/cross_bert --cross $F/grad/cross_distilbert/model --pairs $T/pairs_bars.txt --out $T/m
check "mutual: bi-1, bi-2, cross-1, cross-2 saved" test -d $T/m/bi-1 -a -d $T/m/bi-2 -a -d $T/m/cross-1 -a -d $T/m/cross-2
check "--help" sh -c "'$K' train self-distill --help | grep -q 'Trans-Encoder'"
printf 'only one text\n' > $T/bad.tsv
expect_exit "a line without a second text" 3 "line 1: expected text1<TAB>text2" -- "$K" train self-distill --bi $F/models/st_bert_mean --cross $F/models/cross_bert --pairs $T/bad.tsv --out $T/x
expect_exit "a cross-encoder as --bi" 1 "must be a dense" -- "$K" train self-distill --bi $F/models/cross_bert --cross $F/models/cross_bert --pairs $T/pairs.tsv --out $T/x
expect_exit "a 2-logit --cross" 1 "one logit" -- "$K" train self-distill --bi $F/models/st_bert_mean --cross $F/models/cross_distilbert --pairs $T/pairs.tsv --out $T/x
expect_exit "half a dev set" 64 "needs --dev-queries" -- "$K" train self-distill --bi $F/models/st_bert_mean --cross $F/models/cross_bert --pairs $T/pairs.tsv --out $T/x --dev-queries $D/queries.tsv
summary "self-distill cli"
