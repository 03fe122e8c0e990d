#!/usr/bin/env bash
# test_train_vq_cli.sh - kestrel train vq (Distill-VQ) from the command line: it rewrites the
# index's FAISS file as a new generation that faiss-cpu reads back with the learned codebooks and
# whose FAISS scores are q.(c + decode(code)); a kill -9 before the commit (KESTREL_TEST_KILL)
# leaves the old generation in use with the same search results; queries + qrels; the query
# encoder trained jointly (saved in the index, used by search, crash-safe); bad input.
set -u
. tests/cli/lib.bash
F=tests/fixtures/models
PY=.venv/bin/python
head -300 ../shared/data/beir-scifact/corpus.jsonl > $T/corpus.jsonl
awk 'NR==FNR { ids[$0] = 1; next } ($3 in ids) { print $1 " 0 " $3 " " $4 }' \
  <(sed -n 's/^{"_id": "\([^"]*\)".*/\1/p' $T/corpus.jsonl) ../shared/data/beir-scifact/qrels/test.trec > $T/qrels.txt
awk 'NR==FNR { q[$1] = 1; next } { match($0, /"_id": "[^"]*"/); id = substr($0, RSTART + 8, RLENGTH - 9); if (id in q) print }' \
  $T/qrels.txt ../shared/data/beir-scifact/queries.jsonl > $T/queries.jsonl
# the manifest read with the sqlite3 shell (make deps installs it); faiss-cpu checks need the venv
manifest() { sqlite3 -readonly "$T/ix/docs.sqlite" "SELECT value FROM manifest WHERE key = '$1'" 2>/dev/null; }
have_py() { [ -x "$PY" ] && "$PY" -c 'import faiss, numpy' 2>/dev/null; }
search() { "$K" search --index $T/ix --query 'vitamin D deficiency and bone density' --stages dense -k 10 --format tsv; }

check "index build (IVF4,PQ4)" "$K" index build --index $T/ix --collection $T/corpus.jsonl --model $F/st_bert_mean --factory 'IVF4,PQ4'
gen0=$(manifest ann_file)
search > $T/before.tsv
cp "$T/ix/$gen0" $T/old.faiss
cp -r $T/ix $T/ixw  # a fresh copy for the default (query-weighted codes) run below

# A crash after the new file is written, before the manifest switches to it.
KESTREL_TEST_KILL=before_commit "$K" train vq --index $T/ix --epochs 1 --candidates 50 >/dev/null 2>&1; rc=$?
[ "$rc" = 137 ] && ok "killed before the commit (exit 137)" || bad "killed before the commit (exit $rc, want 137)"
[ "$(manifest ann_file)" = "$gen0" ] && ok "the manifest still names $gen0" || bad "the manifest names $(manifest ann_file), want $gen0"
check "search after the crash gives the old results" sh -c "$(declare -f search); K='$K' T='$T' search | cmp - $T/before.tsv"
check "the old FAISS file is unchanged" cmp "$T/ix/$gen0" $T/old.faiss

# --val-fraction 0 keeps the last epoch: on 300 documents the held-out queries may prefer the
# start, and then there would be no learned codebooks to read back
# --score-weight 0 (FAISS's nearest codes) on this index: the runs below continue from it, and the
# joint training's loss check assumes the distillation's nearest-code start; the default
# query-weighted codes are checked on the fresh copy $T/ixw after this block
check "train vq (label-free)" "$K" train vq --index $T/ix --epochs 2 --candidates 50 --lr-ivf 1e-3 --lr-pq 1e-3 --seed 3 --val-fraction 0 --score-weight 0
gen1=$(manifest ann_file)
[ "$gen1" != "$gen0" ] && [ -f "$T/ix/$gen1" ] && ok "a new generation: $gen0 -> $gen1" || bad "no new generation ($gen0 -> $gen1)"
if have_py; then
  check "faiss-cpu reads the learned codebooks; its scores are q.(c + decode(code))" $PY tests/tools/vq_faiss_check.py $T/old.faiss "$T/ix/$gen1"
else
  echo "  skip faiss-cpu read-back: no $PY with faiss and numpy (python3 -m venv .venv && .venv/bin/pip install faiss-cpu numpy)"
fi
vq=$(manifest vq_training)
case "$vq" in
  *'"method":"distill-vq"'*'"query_source":"sampled documents"'*) ok "the manifest records the training" ;;
  *) bad "the manifest records the training (vq_training = $vq)" ;;
esac
for want in '"epochs":2' '"documents":300' '"val_fraction":0,' '"kept_epoch":2' '"anchor":0,' '"score_weight":0,' '"refits":0,'; do
  case "$vq" in *"$want"*) ok "vq_training has $want" ;; *) bad "vq_training lacks $want ($vq)" ;; esac
done
# The defaults: query-weighted codes (W from the documents, 8 codebook refits), stored in FAISS as
# they are; faiss-cpu reads the file and its scores are q.(c + decode(code)) of the stored codes.
check "train vq with the defaults (query-weighted codes)" "$K" train vq --index $T/ixw --epochs 1 --candidates 50 --seed 3
mw() { sqlite3 -readonly "$T/ixw/docs.sqlite" "SELECT value FROM manifest WHERE key = '$1'" 2>/dev/null; }
for want in '"score_weight":0.5,' '"refits":8,' '"weighted_error":['; do
  case "$(mw vq_training)" in *"$want"*) ok "default vq_training has $want" ;; *) bad "default vq_training lacks $want ($(mw vq_training))" ;; esac
done
if have_py; then
  check "faiss-cpu reads the query-weighted index; its scores are q.(c + decode(code))" $PY tests/tools/vq_faiss_check.py $T/old.faiss "$T/ixw/$(mw ann_file)"
fi
check "index info counts every query-weighted vector" sh -c "'$K' index info --index $T/ixw | grep -qx 'faiss_vectors	300'"
check "search works on the new generation" sh -c "$(declare -f search); K='$K' T='$T' search | grep -c . | grep -qx 10"
check "index info counts every vector" sh -c "'$K' index info --index $T/ix | grep -qx 'faiss_vectors	300'"

check "train vq with --queries and --qrels" sh -c "'$K' train vq --index $T/ix --queries $T/queries.jsonl --qrels $T/qrels.txt --epochs 1 --candidates 50 --score-weight 0 2>&1 | grep -E -q '^kestrel train vq: [1-9][0-9]* relevant documents'"
case "$(manifest vq_training)" in *'"query_source":"given"'*) ok "the manifest names the given queries" ;; *) bad "the manifest names the given queries ($(manifest vq_training))" ;; esac
case "$(manifest vq_training)" in *'"val_fraction":0.1,'*'"kept_epoch":'[01]*) ok "the manifest records the validation (default 0.1, one epoch: epoch 0 or 1 kept)" ;; *) bad "the manifest records the validation ($(manifest vq_training))" ;; esac

# --train-query-encoder: a crash before the commit leaves the old FAISS file and no query model.
gen2=$(manifest ann_file)
search > $T/before_q.tsv
KESTREL_TEST_KILL=before_commit "$K" train vq --index $T/ix --queries $T/queries.jsonl --train-query-encoder --epochs 1 --candidates 50 >/dev/null 2>&1; rc=$?
[ "$rc" = 137 ] && ok "query-encoder training killed before the commit (exit 137)" || bad "killed before the commit (exit $rc, want 137)"
[ "$(manifest ann_file)" = "$gen2" ] && [ -z "$(manifest query_model)" ] && ok "the manifest still names $gen2 and no query model" || bad "after the crash: ann_file $(manifest ann_file) (want $gen2), query_model '$(manifest query_model)'"
"$K" index info --index $T/ix | grep -qx "query_model	- (queries use the index's model)" && ok "index info: no query model" || bad "index info: $("$K" index info --index $T/ix | grep query_model)"
check "search after the crash gives the old results (original query encoder)" sh -c "$(declare -f search); K='$K' T='$T' search | cmp - $T/before_q.tsv"

out=$("$K" train vq --index $T/ix --queries $T/queries.jsonl --train-query-encoder --lr-query-encoder 1e-3 --epochs 2 --candidates 50 --val-fraction 0 2>&1); rc=$?
[ "$rc" = 0 ] && ok "train vq --train-query-encoder" || bad "train vq --train-query-encoder (exit $rc: $out)"
qm=$(manifest query_model)
case "$qm" in query_model.[0-9]*) [ -f "$T/ix/$qm/model.safetensors" ] && ok "the tuned query encoder is saved in the index ($qm)" || bad "no $T/ix/$qm/model.safetensors" ;; *) bad "manifest query_model = '$qm'" ;; esac
[ -n "$(manifest query_model_fingerprint)" ] && ok "the manifest records its fingerprint" || bad "no query_model_fingerprint"
"$K" index info --index $T/ix | grep -qx "query_model	$qm" && ok "index info names the query model ($qm)" || bad "index info: $("$K" index info --index $T/ix | grep query_model)"
case "$(manifest vq_training)" in *'"query_encoder":{"folder":"'$qm'"'*) ok "vq_training records the query encoder" ;; *) bad "vq_training lacks the query encoder ($(manifest vq_training))" ;; esac
# The training loss falls (printed: loss ivf A -> B, pq C -> D).
echo "$out" | awk '/^kestrel train vq: .* steps in/ { for (i = 1; i <= NF; i++) { if ($i == "ivf") { a = $(i+1); b = $(i+3) } if ($i == "pq") { c = $(i+1); d = $(i+3) } } }
  END { exit !(b + d < a + c) }' && ok "the joint training loss falls" || bad "the joint training loss did not fall ($out)"
# Search embeds queries with the tuned encoder: kestrel's scores are FAISS's for its vector.
QTEXT='vitamin D deficiency and bone density'
"$K" search --index $T/ix --query "$QTEXT" --stages dense -k 10 --format tsv --nprobe 4 > $T/after_q.tsv
cmp -s $T/after_q.tsv $T/before_q.tsv && bad "search results unchanged after query-encoder training" || ok "search results changed"
printf '%s\n' "$QTEXT" | "$K" embed --model "$T/ix/$qm" --query --out $T/tuned.npy 2>/dev/null
printf '%s\n' "$QTEXT" | "$K" embed --model $F/st_bert_mean --query --out $T/orig.npy 2>/dev/null
if have_py; then
  check "search uses the tuned query encoder (scores = FAISS's for its vector, not the original's)" $PY tests/tools/vq_qenc_check.py "$T/ix/$(manifest ann_file)" $T/tuned.npy $T/orig.npy $T/after_q.tsv
else
  echo "  skip the faiss-cpu score check: no $PY with faiss and numpy"
fi
# A damaged query model is refused at open, naming it.
cp "$T/ix/$qm/model.safetensors" $T/qm.bak
printf 'x' >> "$T/ix/$qm/model.safetensors"
expect_exit "a query model changed on disk is refused" 1 "fingerprint" -- "$K" search --index $T/ix --query x
cp $T/qm.bak "$T/ix/$qm/model.safetensors"
# A later run without the flag keeps the tuned encoder.
check "train vq without the flag keeps the query encoder" "$K" train vq --index $T/ix --queries $T/queries.jsonl --epochs 1 --candidates 50
[ "$(manifest query_model)" = "$qm" ] && ok "query_model still $qm" || bad "query_model became '$(manifest query_model)'"
# Pruning: a second tuned encoder keeps the first beside it (a reader that opened the index before
# the commit may still load it); the next commit removes it, as older FAISS generations are.
mkdir -p "$T/ix/query_model.999"  # an orphan (as a crash before a commit leaves)
check "a second --train-query-encoder run" "$K" train vq --index $T/ix --queries $T/queries.jsonl --train-query-encoder --epochs 1 --candidates 50
qm2=$(manifest query_model)
[ "$qm2" != "$qm" ] && [ -d "$T/ix/$qm2" ] && [ -d "$T/ix/$qm" ] && [ ! -e "$T/ix/query_model.999" ] &&
  ok "new $qm2 and previous $qm kept, the orphan removed" || bad "after the second run: $(ls $T/ix | grep query_model | tr '\n' ' ') (manifest $qm2)"
check "train vq without the flag" "$K" train vq --index $T/ix --queries $T/queries.jsonl --epochs 1 --candidates 50
[ -d "$T/ix/$qm2" ] && [ ! -e "$T/ix/$qm" ] && ok "the next commit prunes $qm, keeps $qm2" || bad "after the next commit: $(ls $T/ix | grep query_model | tr '\n' ' ')"
qm=$qm2

# --doc-vectors: the documents' vectors from `kestrel embed` (rows named by an ids file, any
# order) instead of encoding the collection again; checked against the model.
"$PY" -c "
import json, sys
rows = [json.loads(l) for l in open('$T/corpus.jsonl')][::-1]
open('$T/dids.txt', 'w').write(''.join(r['_id'] + '\\n' for r in rows))
open('$T/dtexts.txt', 'w').write(''.join(' '.join(((r.get('title') or '') + ' ' + (r.get('text') or '')).split()) + '\\n' for r in rows))
" 2>/dev/null || awk '{ print }' /dev/null
if [ -s $T/dids.txt ]; then
  "$K" embed --model $F/st_bert_mean --out $T/dv.npy < $T/dtexts.txt 2>/dev/null
  check "train vq --doc-vectors (no re-encoding)" sh -c "'$K' train vq --index $T/ix --epochs 1 --candidates 50 --doc-vectors $T/dv.npy --doc-ids $T/dids.txt 2>&1 | grep -q '300 document vectors from .*(8 checked against the model)'"
  "$K" embed --model $F/st_bert_sqrtlen_tokjson --out $T/dv_other.npy < $T/dtexts.txt 2>/dev/null
  expect_exit "--doc-vectors of another model are refused" 1 "differs from the index model" -- "$K" train vq --index $T/ix --doc-vectors $T/dv_other.npy --doc-ids $T/dids.txt
  head -299 $T/dids.txt > $T/dids_short.txt
  expect_exit "--doc-ids with a row count other than the vectors'" 3 "299 ids for the 300 rows" -- "$K" train vq --index $T/ix --doc-vectors $T/dv.npy --doc-ids $T/dids_short.txt
  expect_exit "--doc-vectors without --doc-ids" 64 "go together" -- "$K" train vq --index $T/ix --doc-vectors $T/dv.npy
fi

expect_exit "--index is required" 64 "--index is required" -- "$K" train vq
expect_exit "--train-query-encoder without --queries" 64 "needs --queries" -- "$K" train vq --index $T/ix --train-query-encoder
expect_exit "a bad --lr-query-encoder" 64 "positive number" -- "$K" train vq --index $T/ix --lr-query-encoder 0
expect_exit "a bad learning rate" 64 "positive number" -- "$K" train vq --index $T/ix --lr-pq -1
expect_exit "a bad --val-fraction" 64 "in [0, 0.9)" -- "$K" train vq --index $T/ix --val-fraction 1.5
expect_exit "a bad --score-weight" 64 "in [0, 1]" -- "$K" train vq --index $T/ix --score-weight 1.5
expect_exit "a negative --anchor" 64 ">= 0" -- "$K" train vq --index $T/ix --anchor -1
expect_exit "--qrels without --queries" 64 "--qrels needs --queries" -- "$K" train vq --index $T/ix --qrels $T/qrels.txt
check "build a Flat index" "$K" index build --index $T/flat --collection $T/corpus.jsonl --model $F/st_bert_mean --factory Flat
expect_exit "a Flat index has nothing to learn" 6 "IVF-PQ" -- "$K" train vq --index $T/flat
expect_exit "a missing index" 5 "$T/none" -- "$K" train vq --index $T/none
check "train vq --help" sh -c "'$K' train vq --help | grep -q 'Distill-VQ'"
check "train vq --help documents --train-query-encoder" sh -c "'$K' train vq --help | grep -q 'query_model.N'"
check "train vq --help documents --score-weight" sh -c "'$K' train vq --help | grep -q -- --score-weight"
summary "train vq CLI"
