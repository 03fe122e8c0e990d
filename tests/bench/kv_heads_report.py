#!/usr/bin/env python3
"""kv_heads_report.py FILE... - sums bench_kv_heads' per-head lines (kv.sh) per budget: the mean
and max over query heads of the mean relative L2 output error, the mean recall@100, keys scanned,
cache attended, widened searches and (newer benches) the mean CPU time of a step. A FILE's "== ..." header
lines name its cache; files are reported one by one."""
import sys
from collections import OrderedDict


def report(path):
    rows = OrderedDict()
    head = None
    with open(path) as fh:
        for line in fh:
            if line.startswith("== ") and head is None:
                head = line.strip()
            f = line.split()
            if len(f) in (10, 11, 12) and f[0].startswith("L") and f[0][1:].isdigit():
                key = (int(f[2]), int(f[3]), int(f[4]))
                rows.setdefault(key, []).append((f[0] + "H" + f[1], float(f[5]), float(f[6].rstrip("%")),
                                                 float(f[7]), float(f[8]), float(f[9].rstrip("%")),
                                                 float(f[10].rstrip("%")) if len(f) >= 11 else 0.0,
                                                 float(f[11]) if len(f) == 12 else float("nan")))
    print(f"{path}: {head or '(no header)'}")
    print(f"{'top_k':>6} {'ef':>5} {'tail':>5} {'heads':>5} {'err mean':>9} {'err max (head)':>22} "
          f"{'max single query':>16} {'recall@100':>10} {'scanned':>8} {'attended':>8} {'widened':>8} {'cpu us':>8}")
    for (k, ef, tail), r in rows.items():
        n = len(r)
        worst = max(r, key=lambda x: x[3])
        print(f"{k:6d} {ef:5d} {tail:5d} {n:5d} {sum(x[3] for x in r) / n:9.2e} {worst[3]:9.2e} ({worst[0]:>9s}) "
              f"{max(x[4] for x in r):16.2e} {sum(x[1] for x in r) / n:10.3f} {sum(x[2] for x in r) / n:7.2f}% "
              f"{sum(x[5] for x in r) / n:7.1f}% {sum(x[6] for x in r) / n:7.1f}% {sum(x[7] for x in r) / n:8.1f}")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: kv_heads_report.py FILE...")
    for p in sys.argv[1:]:
        report(p)
