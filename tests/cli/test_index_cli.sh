#!/usr/bin/env bash
# test_index_cli.sh - kestrel index / search / eval from the command line: build from a file, a
# gzip and an http:// URL (a server on 127.0.0.1 that this test starts), search in every format,
# a query file into a TREC run scored by eval, add/replace/delete, and bad input.
set -u
. tests/cli/lib.bash
F=tests/fixtures/models
srv=""
trap '[ -n "$srv" ] && kill $srv 2>/dev/null; rm -rf "$T"' EXIT
head -300 ../shared/data/beir-scifact/corpus.jsonl > $T/corpus.jsonl
gzip -c $T/corpus.jsonl > $T/corpus.jsonl.gz
# queries whose relevant documents are among the first 300
awk 'NR==FNR { ids[$0] = 1; next } ($3 in ids) { print $1 " 0 " $3 " " $4 }' \
  <(sed -n 's/^{"_id": "\([^"]*\)".*/\1/p' $T/corpus.jsonl) ../shared/data/beir-scifact/qrels/test.trec > $T/qrels.txt
awk 'NR==FNR { q[$1] = 1; next } { match($0, /"_id": "[^"]*"/); id = substr($0, RSTART + 8, RLENGTH - 9); if (id in q) print }' \
  $T/qrels.txt ../shared/data/beir-scifact/queries.jsonl > $T/queries.jsonl

check "index build (BEIR jsonl, dense + ColBERT + cross)" "$K" index build --index $T/ix --collection $T/corpus.jsonl \
  --model $F/st_bert_mean --colbert $F/colbert --cross $F/cross_bert
check "index info" sh -c "'$K' index info --index $T/ix | grep -q '^documents	300$'"
check "search text" sh -c "'$K' search --index $T/ix --query 'vitamin D and bone density' -k 3 | grep -c . | grep -q 3"
check "search json" sh -c "'$K' search --index $T/ix --query 'vitamin D' --format json | python3 -c 'import json,sys; h=json.load(sys.stdin); assert len(h)==10 and all(\"id\" in x for x in h)'"
check "search --ids-only: the same ids and scores, no text" bash -c "diff <('$K' search --index $T/ix --query 'vitamin D' --stages dense --format tsv | cut -f1,2) <('$K' search --index $T/ix --query 'vitamin D' --stages dense --format tsv --ids-only | cut -f1,2) && '$K' search --index $T/ix --query 'vitamin D' --ids-only --format json | python3 -c 'import json,sys; h=json.load(sys.stdin); assert len(h)==10 and all(\"text\" not in x for x in h)'"
check "search tsv stages" sh -c "'$K' search --index $T/ix --query 'vitamin D' --stages bm25 --format tsv | cut -f3 | sort -u | grep -qx bm25"
check "search fused first stage" sh -c "'$K' search --index $T/ix --query 'vitamin D' --stages dense,bm25 --format tsv | cut -f3 | sort -u | grep -qx rrf"
check "search all stages ends with the cross-encoder" sh -c "'$K' search --index $T/ix --query 'vitamin D' --format tsv | cut -f3 | sort -u | grep -qx cross"
check "queries file to TREC run, scored by eval" sh -c "'$K' search --index $T/ix --queries $T/queries.jsonl --run $T/run.trec -k 100 --stages bm25 && '$K' eval --qrels $T/qrels.txt --run $T/run.trec | grep -q ndcg_cut_10"
check "the run has one block per query" sh -c "test \$(cut -d' ' -f1 $T/run.trec | sort -u | wc -l) = \$(wc -l < $T/queries.jsonl)"

# a BM25-only index from a gzip, and one over http:// from a server on 127.0.0.1
check "index build --bm25-only from gzip" "$K" index build --index $T/bm --collection $T/corpus.jsonl.gz --bm25-only
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')
(cd $T && exec timeout 120 python3 -m http.server "$port" --bind 127.0.0.1 >/dev/null 2>&1) & srv=$!
for i in $(seq 50); do
  python3 -c "import urllib.request,sys; urllib.request.urlopen(sys.argv[1], timeout=1)" "http://127.0.0.1:$port/corpus.jsonl" 2>/dev/null && break
  sleep 0.1
done
check "index build from an http:// URL" "$K" index build --index $T/web --collection "http://127.0.0.1:$port/corpus.jsonl.gz" --bm25-only
check "the URL-built index equals the file-built one" bash -c "diff <('$K' search --index $T/web --query 'vitamin D' --format tsv) <('$K' search --index $T/bm --query 'vitamin D' --format tsv)"
expect_exit "HTTP 404 names the URL" 2 "404" -- "$K" index build --index $T/web404 --collection "http://127.0.0.1:$port/missing.jsonl" --bm25-only
kill $srv 2>/dev/null; srv=""

# add (replace) and delete
printf '4983\tZebra\tquokka xylophone\nnew1\tNew\tquokka again\n' > $T/add.tsv
check "index add replaces an existing id" sh -c "'$K' index add --index $T/ix --collection $T/add.tsv 2>&1 | grep -q '1 replaced'"
check "search finds the new text" sh -c "'$K' search --index $T/ix --query 'xylophone quokka' --stages bm25 --format tsv | head -1 | cut -f1 | grep -qx 4983"
printf '4983\nnew1\nnot-there\n' > $T/del.txt
check "index delete" sh -c "'$K' index delete --index $T/ix --ids $T/del.txt 2>&1 | grep -q 'deleted 2 of 3'"
check "deleted documents are gone" sh -c "! '$K' search --index $T/ix --query 'xylophone quokka' --stages bm25 --format tsv | grep -q ."
check "info after the changes" sh -c "'$K' index info --index $T/ix | grep -q '^documents	299$'"

# bad input
expect_exit "build into a non-empty folder" 1 "not empty" -- "$K" index build --index $T/ix --collection $T/add.tsv --bm25-only
expect_exit "no such index" 5 "no index here" -- "$K" search --index $T/nope --query x
printf 'ok\tfine\nbroken-line-without-tab\n' > $T/badcol.tsv
expect_exit "malformed collection line" 3 "line 2" -- "$K" index add --index $T/ix --collection $T/badcol.tsv
check "the failed add changed nothing" sh -c "'$K' index info --index $T/ix | grep -q '^documents	299$'"
expect_exit "unknown factory string" 1 "Bogus" -- "$K" index build --index $T/f --collection $T/add.tsv --model $F/st_bert_mean --factory 'IVF4,Bogus'
expect_exit "wrong model for the index" 1 "fingerprint" -- "$K" search --index $T/ix --query x --model $F/st_bert_cls_dense
expect_exit "dense stage on a BM25-only index" 1 "dense model" -- "$K" search --index $T/bm --query x --stages dense
expect_exit "search without a query" 64 "either --query" -- "$K" search --index $T/ix
expect_exit "build without a model" 64 "--model DIR (or --bm25-only)" -- "$K" index build --index $T/z --collection $T/add.tsv
check "index --help" sh -c "'$K' index --help | grep -q 'kestrel index build'"
check "search --help" sh -c "'$K' search --help | grep -q -- '--stages'"

summary "index cli"
