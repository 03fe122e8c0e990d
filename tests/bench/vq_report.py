"""vq_report.py VQ.TXT - the Distill-VQ benchmark's summary: per set and size, each method's
recall@10 beside OPQ + IVF-PQ's (the anchor), as a difference in points, and the qrels metrics."""
import re
import sys
from collections import defaultdict

rec = defaultdict(dict)
qrels = defaultdict(dict)
for line in open(sys.argv[1]):
    m = re.match(r"(\S+)\s+(\d+) B\s+(\S+)\s+recall@10 ([\d.]+)\s+recall@100 ([\d.]+)", line)
    if m:
        rec[(m[1], int(m[2]))][m[3]] = (float(m[4]), float(m[5]))
    m = re.match(r"qrels (\S+)\.(\S+)\.(\d+)\s+MRR@10 ([\d.]+)\s+nDCG@10 ([\d.]+)", line)
    if m:
        qrels[(m[1], int(m[3]))][m[2]] = (float(m[4]), float(m[5]))

print("\nsummary: recall@10 (points vs OPQ+IVF-PQ, the anchor) | recall@100 | MRR@10 / nDCG@10")
for (s, b), methods in sorted(rec.items()):
    if "opq+ivfpq" not in methods:
        continue
    anchor = methods["opq+ivfpq"][0]
    for meth in ("ivfpq", "opq+ivfpq", "distill-vq", "opq+distill-vq"):
        if meth not in methods:
            continue
        r10, r100 = methods[meth]
        q = qrels.get((s, b), {}).get(meth)
        qs = f"  MRR@10 {q[0]:.4f} nDCG@10 {q[1]:.4f}" if q else ""
        print(f"  {s:8s} {b:2d} B  {meth:15s} R@10 {r10:.4f} ({100 * (r10 - anchor):+5.1f})  "
              f"R@100 {r100:.4f}{qs}")
for (s, b), methods in sorted(qrels.items()):
    if "exact" in methods:
        print(f"  {s:8s} exact (float32) MRR@10 {methods['exact'][0]:.4f} nDCG@10 {methods['exact'][1]:.4f}")
verdict = []
for (s, b), methods in sorted(rec.items()):
    if b == 16 and "opq+ivfpq" in methods:
        best = max(methods.get(k, (0, 0))[0] for k in ("distill-vq", "opq+distill-vq"))
        verdict.append(f"{s} {100 * (best - methods['opq+ivfpq'][0]):+.1f}")
if verdict:
    print("target (Distill-VQ >= OPQ+IVF-PQ + 2 points recall@10 at 16 B on every set): " +
          ", ".join(verdict))
