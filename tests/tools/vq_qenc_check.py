"""vq_qenc_check.py INDEX.faiss TUNED.npy ORIG.npy HITS.tsv - checks, with faiss-cpu (the
reference), that `kestrel search` on an index with a tuned query encoder embedded the query with
it: the scores kestrel printed (HITS.tsv: id, score, ...; one query, top k) equal FAISS's own
search scores of the tuned encoder's vector TUNED.npy (1, d) on the index file, and differ from
those of the original model's vector ORIG.npy (the prediction: the tuned vector moved, so the
scores move). nprobe is set to the index's nlist (every list). Exit 0 and "ok", or 1 with the
reason."""
import sys

import faiss
import numpy as np


def main(path, tuned_path, orig_path, hits_path):
    ix = faiss.read_index(path)
    faiss.extract_index_ivf(ix).nprobe = faiss.extract_index_ivf(ix).nlist
    tuned, orig = np.load(tuned_path).astype(np.float32), np.load(orig_path).astype(np.float32)
    got = np.array([float(l.split("\t")[1]) for l in open(hits_path) if l.strip()], dtype=np.float32)
    k = len(got)
    assert k > 0, f"{hits_path}: no hits"
    st, _ = ix.search(tuned, k)
    so, _ = ix.search(orig, k)
    assert np.allclose(got, st[0], atol=1e-4), f"kestrel's scores {got} are not FAISS's for the tuned vector {st[0]}"
    gap = np.abs(st[0] - so[0]).max()
    assert gap > 1e-3, f"the tuned and original vectors give the same FAISS scores (max gap {gap:.2e})"
    assert not np.allclose(got, so[0], atol=1e-4), "kestrel's scores are the original model's"
    print(f"ok: {k} scores equal FAISS's for the tuned vector (max diff "
          f"{np.abs(got - st[0]).max():.1e}); the original vector's differ by up to {gap:.3f}")


if __name__ == "__main__":
    try:
        main(*sys.argv[1:5])
    except AssertionError as e:
        print(f"vq_qenc_check: {e}")
        sys.exit(1)
