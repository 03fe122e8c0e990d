#!/usr/bin/env bash
# scifact_triples.sh OUTDIR TEACHER_MODEL [N] - a small Margin-MSE training file from SciFact's
# training qrels: for each of the first N train queries, its relevant abstract as the positive and
# the best BM25 hit that is not relevant as the hard negative; teacher scores from TEACHER_MODEL
# via `kestrel score`. Writes OUTDIR/triples.tsv (matchmaker form:
# pos_score<TAB>neg_score<TAB>query<TAB>pos_text<TAB>neg_text).
set -euo pipefail
out=${1:?usage: scifact_triples.sh OUTDIR TEACHER_MODEL [N]}
teacher=${2:?teacher model folder}
n=${3:-256}
K=${KESTREL:-build/kestrel}
S=${KESTREL_SHARED:-../shared/data}/beir-scifact
mkdir -p "$out"
[ -d "$out/bm25" ] || "$K" index build --index "$out/bm25" --collection "$S/corpus.jsonl" --bm25-only >/dev/null 2>&1
python3 - "$S" "$out" "$n" <<'PY'
import json, sys
S, out, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
docs = {}
for line in open(f"{S}/corpus.jsonl"):
    d = json.loads(line); docs[d["_id"]] = (d["title"] + " " + d["text"]).replace("\t", " ").replace("\n", " ")
queries = {}
for line in open(f"{S}/queries.jsonl"):
    q = json.loads(line); queries[q["_id"]] = q["text"].replace("\t", " ")
rel = {}
for i, line in enumerate(open(f"{S}/qrels/train.tsv")):
    if i == 0: continue
    q, d, s = line.split()
    rel.setdefault(q, []).append(d)
with open(f"{out}/train_queries.tsv", "w") as f:
    for q in list(rel)[:n]:
        f.write(f"{q}\t{queries[q]}\n")
json.dump({"docs": {k: v for k, v in docs.items()}, "rel": rel, "queries": queries}, open(f"{out}/lookup.json", "w"))
PY
"$K" search --index "$out/bm25" --queries "$out/train_queries.tsv" --run "$out/bm25.run" -k 10 --stages bm25 >/dev/null 2>&1
python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
L = json.load(open(f"{out}/lookup.json"))
hits = {}
for line in open(f"{out}/bm25.run"):
    q, _, d, r, s, _ = line.split()
    hits.setdefault(q, []).append(d)
with open(f"{out}/pairs_pos.tsv", "w") as fp, open(f"{out}/pairs_neg.tsv", "w") as fn, open(f"{out}/texts.tsv", "w") as ft:
    for line in open(f"{out}/train_queries.tsv"):
        q, text = line.rstrip("\n").split("\t", 1)
        neg = next((d for d in hits.get(q, []) if d not in L["rel"][q]), None)
        if neg is None: continue
        pos = L["rel"][q][0]
        fp.write(f"{text}\t{L['docs'][pos]}\n"); fn.write(f"{text}\t{L['docs'][neg]}\n")
        ft.write(f"{text}\t{L['docs'][pos]}\t{L['docs'][neg]}\n")
PY
"$K" score --model "$teacher" --pairs "$out/pairs_pos.tsv" > "$out/s_pos.txt"
"$K" score --model "$teacher" --pairs "$out/pairs_neg.tsv" > "$out/s_neg.txt"
paste "$out/s_pos.txt" "$out/s_neg.txt" "$out/texts.tsv" > "$out/triples.tsv"
echo "scifact_triples: $(wc -l < "$out/triples.tsv") triples in $out/triples.tsv" >&2
