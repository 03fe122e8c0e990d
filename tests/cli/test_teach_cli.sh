#!/usr/bin/env bash
# test_teach_cli.sh - `kestrel teach`: local scores against transformers' (fx_teach.py), remote
# scores through `kestrel serve-rerank` on 127.0.0.1 equal to the local ones, and the HTTP client's
# behaviour against a misbehaving stand-in server (tests/cli/rerank_stub.py): retries on 503 and on
# dropped connections, a clear error and no output on a malformed answer, a 404 or a time-out.
set -u
. tests/cli/lib.bash
F=tests/fixtures
D=$F/teach
M=$F/models/cross_bert
pids=""
trap 'for p in $pids; do kill $p 2>/dev/null; done; rm -rf "$T"' EXIT
IDS="--triples $D/triples_ids.tsv --queries $D/queries.tsv --collection $D/collection.tsv"
# same ids, and every score within 1e-5 of the reference (float32 against float32)
same_scores() { # GOT WANT TOL
  [ "$(wc -l < "$1")" = "$(wc -l < "$2")" ] &&
  paste "$1" "$2" | awk -F'\t' -v tol="$3" '{ n = NF / 2; for (i = 3; i <= n; i++) if ($i != $(i + n)) exit 1
      for (i = 1; i <= 2; i++) { d = $i - $(i + n); if (d < 0) d = -d; if (d > tol) { print "line " NR ": " $i " vs " $(i + n); exit 1 } } }'
}
check "local, id triples: Hofstaetter file" "$K" teach --model $M $IDS --out $T/local.tsv
check "local scores = transformers' (1e-5)" same_scores $T/local.tsv $D/expected.tsv 1e-5
check "local, text triples" "$K" teach --model $M --triples $D/triples_text.tsv --out $T/local_text.tsv --batch-size 3
check "text triples: matchmaker lines with the same scores" sh -c "paste $T/local_text.tsv $D/expected.tsv | awk -F'\t' '{d=\$1-\$6; e=\$2-\$7; if (d*d > 1e-10 || e*e > 1e-10) exit 1}' && cut -f3- $T/local_text.tsv | cmp - $D/triples_text.tsv"

# kestrel serve-rerank on a free port
"$K" serve-rerank --model $M --port 0 > $T/srv.out 2> $T/srv.err & srv=$!; pids="$pids $srv"
for i in $(seq 100); do grep -q listening $T/srv.out 2>/dev/null && break; sleep 0.1; done
URL=$(sed -n 's/^listening on //p' $T/srv.out)
check "serve-rerank is up" test -n "$URL"
check "remote (serve-rerank), id triples" "$K" teach --teacher-url "$URL" $IDS --out $T/remote.tsv --batch-size 4
check "remote scores = local scores (1e-6)" same_scores $T/remote.tsv $T/local.tsv 1e-6
check "remote, text triples, URL ending in /rerank" "$K" teach --teacher-url "$URL/rerank" --triples $D/triples_text.tsv --out $T/remote_text.tsv
check "remote text = local text (1e-6)" same_scores $T/remote_text.tsv $T/local_text.tsv 1e-6
check "serve-rerank: sigmoid scores by default, sorted" sh -c "curl -s -X POST -H 'Content-Type: application/json' -d '{\"query\":\"capital of Japan\",\"texts\":[\"a dog\",\"Tokyo is the capital of Japan.\"]}' $URL/rerank | python3 -c 'import json,sys; a=json.load(sys.stdin); assert len(a)==2 and a[0][\"score\"]>=a[1][\"score\"] and all(0<x[\"score\"]<1 for x in a), a'"
check "serve-rerank: 422 on a bad request" sh -c "test \"\$(curl -s -o /dev/null -w '%{http_code}' -X POST -d '{\"texts\":[]}' $URL/rerank)\" = 422"
kill $srv; wait $srv 2>/dev/null

# the stand-in server: score = UTF-8 byte length of the text
LC_ALL=C awk -F'\t' '{print length($2) "\t" length($3) "\t" $0}' $D/triples_text.tsv > $T/bytes.tsv
stub() { # MODE [N]: starts the stub, sets SURL
  : > $T/port; : > $T/stub.log
  STUB_LOG=$T/stub.log python3 tests/cli/rerank_stub.py "$@" > $T/port 2> $T/stub.err & spid=$!; pids="$pids $spid"
  for i in $(seq 100); do [ -s $T/port ] && break; sleep 0.1; done
  SURL="http://127.0.0.1:$(cat $T/port)"
}
teach_stub() { "$K" teach --teacher-url "$SURL" --triples $D/triples_text.tsv --retry-wait 0.05 "$@"; }
stub ok
check "stub: one request per query (4 queries), raw scores asked for" sh -c "$(declare -f teach_stub); K='$K' SURL='$SURL' D='$D'; teach_stub --out $T/ok.tsv && test \$(wc -l < $T/stub.log) = 4 && ! grep -qv '\"raw\": true' $T/stub.log"
check "stub: scores as answered, in input order" cmp $T/ok.tsv $T/bytes.tsv
check "stub: one connection reused for every request" test "$(sed 's/.*"port": \([0-9]*\).*/\1/' $T/stub.log | sort -u | wc -l)" = 1
kill $spid
stub flaky 2
check "503 twice, then OK: retried" sh -c "$(declare -f teach_stub); K='$K' SURL='$SURL' D='$D'; teach_stub --out $T/flaky.tsv 2> $T/flaky.err && grep -q '2 retries' $T/flaky.err && cmp $T/flaky.tsv $T/bytes.tsv"
kill $spid
stub drop 1
check "connection dropped once, then OK: retried" sh -c "$(declare -f teach_stub); K='$K' SURL='$SURL' D='$D'; teach_stub --out $T/drop.tsv 2> $T/drop.err && grep -q '1 retries' $T/drop.err && cmp $T/drop.tsv $T/bytes.tsv"
kill $spid
stub flaky 100
expect_exit "503 past --retries: fails, names the status" 2 "HTTP 503 after retries" -- "$K" teach --teacher-url "$SURL" --triples $D/triples_text.tsv --retry-wait 0.01 --retries 2 --out $T/f2.tsv
check "... and nothing is written" test ! -e $T/f2.tsv
check "... exactly 1 + 2 attempts" test "$(wc -l < $T/stub.log)" = 3
kill $spid
stub malformed
expect_exit "malformed answer: clear error" 3 "is not a JSON array" -- "$K" teach --teacher-url "$SURL" --triples $D/triples_text.tsv --out $T/m.tsv
check "... not retried, nothing written" sh -c "test ! -e $T/m.tsv && test \$(wc -l < $T/stub.log) = 1 && ! ls $T/m.tsv.tmp* 2>/dev/null"
kill $spid
stub badindex
expect_exit "answer with a repeated index" 3 "expected each of 0..1 once" -- "$K" teach --teacher-url "$SURL" --triples $D/triples_text.tsv --out $T/b.tsv
kill $spid
stub notfound
expect_exit "HTTP 404: fails at once" 2 "HTTP 404" -- "$K" teach --teacher-url "$SURL" --triples $D/triples_text.tsv --out $T/n.tsv
kill $spid
stub slow
expect_exit "time-out, no retries left" 2 "timed out" -- "$K" teach --teacher-url "$SURL" --triples $D/triples_text.tsv --timeout 0.5 --retries 0 --out $T/s.tsv
kill $spid
expect_exit "nothing listening: connection refused after retries" 2 "after retries" -- "$K" teach --teacher-url "http://127.0.0.1:1" --triples $D/triples_text.tsv --retries 1 --retry-wait 0.01 --out $T/c.tsv

printf 'q1\td1\n' > $T/bad.tsv
expect_exit "triple with a missing column" 3 "line 1: 2 columns, expected 3" -- "$K" teach --model $M --triples $T/bad.tsv --out $T/x.tsv
printf 'q1\td1\td5\nq9\td1\td5\n' > $T/unk.tsv
expect_exit "unknown qid names the line" 3 "line 2: unknown qid \"q9\"" -- "$K" teach --model $M --triples $T/unk.tsv --queries $D/queries.tsv --collection $D/collection.tsv --out $T/x.tsv
check "nothing written on failure" test ! -e $T/x.tsv
expect_exit "a dense model is no teacher" 1 "cross-encoder" -- "$K" teach --model $F/models/st_bert_mean --triples $D/triples_text.tsv --out $T/x.tsv
expect_exit "one teacher only" 64 "one of --model and --teacher-url" -- "$K" teach --model $M --teacher-url http://127.0.0.1:1 --triples $D/triples_text.tsv --out $T/x.tsv
check "--help" sh -c "'$K' teach --help | grep -q 'raw_scores' && '$K' serve-rerank --help | grep -q '/rerank'"
summary "teach cli"
