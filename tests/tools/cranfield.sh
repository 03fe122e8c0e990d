#!/usr/bin/env bash
# cranfield.sh OUTDIR - converts the Cranfield collection in ../shared/data/cranfield into the
# formats kestrel reads: docs.tsv (id<TAB>title<TAB>abstract), queries.tsv (qid<TAB>text, qid =
# the query's POSITION 1..225 in cran.qry, which is how cranqrel numbers them, not its .I
# number) and qrels.txt (TREC, gain = 5 - code for codes 1-4, 0 for -1; via kestrel eval).
set -euo pipefail
out=${1:?usage: cranfield.sh OUTDIR [KESTREL]}
K=${2:-build/kestrel}
src=${KESTREL_SHARED:-../shared/data}/cranfield
mkdir -p "$out"
# Records: ".I n", then field markers .T .A .B .W each followed by its lines.
awk 'function flush() { if (id != "") { gsub(/[ \t]+/, " ", t); gsub(/[ \t]+/, " ", w);
       sub(/^ /, "", t); sub(/ $/, "", t); sub(/^ /, "", w); sub(/ $/, "", w);
       print id "\t" t "\t" w } }
     /^\.I / { flush(); id = $2; t = ""; w = ""; f = ""; next }
     /^\.[TABW]$/ { f = substr($0, 2, 1); next }
     { if (f == "T") t = t " " $0; else if (f == "W") w = w " " $0 }
     END { flush() }' "$src/cran.all.1400" > "$out/docs.tsv"
tr -d '\r' < "$src/cran.qry" | awk '
     function flush() { if (n > 0) { gsub(/[ \t]+/, " ", q); sub(/^ /, "", q); sub(/ $/, "", q); print n "\t" q } }
     /^\.I / { flush(); n++; q = ""; next }
     /^\.W$/ { next }
     { q = q " " $0 }
     END { flush() }' > "$out/queries.tsv"
"$K" eval --qrels "$src/cranqrel" --qrels-format cranfield --write-qrels "$out/qrels.txt" >/dev/null
echo "cranfield: $(wc -l < "$out/docs.tsv") docs, $(wc -l < "$out/queries.tsv") queries, $(wc -l < "$out/qrels.txt") qrels in $out" >&2
