#!/usr/bin/env bash
# test_mine_cli.sh - `kestrel mine` on a tiny index (the 100-document SciFact slice of
# tests/fixtures/train_eval, BM25 and the st_bert_mean dense model): every line is
# qid<TAB>positive<TAB>negative with the positive judged relevant and the negative not; the
# negatives are exactly the best-ranked non-relevant hits of `kestrel search` with the same first
# stage after --skip-top; positives x negatives lines per query; bad input refused, nothing written.
set -u
. tests/cli/lib.bash
F=tests/fixtures
E=$F/train_eval
check "index the slice (dense + BM25)" "$K" index build --index $T/ix --collection $E/corpus.jsonl --model $F/models/st_bert_mean
check "mine bm25, 3 negatives, skip the top 1" "$K" mine --index $T/ix --queries $E/queries.tsv --qrels $E/qrels.trec --out $T/bm25.tsv --first-stage bm25 --negatives 3 --skip-top 1
check "mine dense, 2 negatives" "$K" mine --index $T/ix --queries $E/queries.tsv --qrels $E/qrels.trec --out $T/dense.tsv --first-stage dense --negatives 2
check "search runs to compare with (bm25, dense)" sh -c "'$K' search --index $T/ix --queries $E/queries.tsv --run $T/bm25.run -k 50 --stages bm25 && '$K' search --index $T/ix --queries $E/queries.tsv --run $T/dense.run -k 50 --stages dense"
# expected triples from the run and the qrels: per query (queries-file order), per positive (qrels
# order), the first N hits after the top K (run order) that are not positives
expected() { # RUN N SKIP
  awk -v N=$2 -v S=$3 -F'[ \t]' '
    FILENAME == ARGV[1] { if ($4 >= 1) { pos[$1] = pos[$1] " " $3; ispos[$1, $3] = 1 }; next }
    FILENAME == ARGV[2] { r = ++rank[$1]; if (r > S && !ispos[$1, $3] && cnt[$1] < N) { neg[$1] = neg[$1] " " $3; cnt[$1]++ }; next }
    { q = $1; np = split(pos[q], P, " "); nn = split(neg[q], G, " ");
      for (i = 1; i <= np; i++) for (j = 1; j <= nn; j++) printf "%s\t%s\t%s\n", q, P[i], G[j] }' \
    $E/qrels.trec "$1" $E/queries.tsv
}
expected $T/bm25.run 3 1 > $T/bm25.want
expected $T/dense.run 2 0 > $T/dense.want
check "bm25 triples = best non-relevant BM25 hits after the top 1" diff $T/bm25.want $T/bm25.tsv
check "dense triples = best non-relevant dense hits" diff $T/dense.want $T/dense.tsv
check "3 triples per positive (bm25)" test "$(wc -l < $T/bm25.tsv)" = "$(( $(awk '$4 >= 1' $E/qrels.trec | wc -l) * 3 ))"
check "no negative is a positive" sh -c "awk 'NR == FNR { p[\$1 \" \" \$3] = 1; next } p[\$1 \" \" \$3] { exit 1 }' $E/qrels.trec $T/bm25.tsv"
check "three tab-separated columns" sh -c "awk -F'\t' 'NF != 3 { exit 1 }' $T/bm25.tsv $T/dense.tsv"
check "--help" sh -c "'$K' mine --help | grep -q 'qid<TAB>pos_pid<TAB>neg_pid'"
check "BM25-only index" "$K" index build --index $T/bm --collection $E/corpus.jsonl --bm25-only
expect_exit "dense mining on a BM25-only index" 1 "BM25 only" -- "$K" mine --index $T/bm --queries $E/queries.tsv --qrels $E/qrels.trec --out $T/x.tsv --first-stage dense
check "dense mining on a BM25-only index: nothing written" test ! -e $T/x.tsv
printf 'q1 0 d1\n' > $T/bad.qrels
expect_exit "malformed qrels" 3 "bad.qrels" -- "$K" mine --index $T/ix --queries $E/queries.tsv --qrels $T/bad.qrels --out $T/x.tsv
check "malformed qrels: nothing written" test ! -e $T/x.tsv
printf 'nope 0 d1 1\n' > $T/other.qrels
expect_exit "qrels of other queries" 5 "do the qids match" -- "$K" mine --index $T/ix --queries $E/queries.tsv --qrels $T/other.qrels --out $T/x.tsv
expect_exit "unknown first stage" 64 "--first-stage" -- "$K" mine --index $T/ix --queries $E/queries.tsv --qrels $E/qrels.trec --out $T/x.tsv --first-stage maxsim
expect_exit "missing --out" 64 "required" -- "$K" mine --index $T/ix --queries $E/queries.tsv --qrels $E/qrels.trec
summary "mine cli"
