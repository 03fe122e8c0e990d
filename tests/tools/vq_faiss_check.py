"""vq_faiss_check.py OLD.faiss NEW.faiss - checks, with faiss-cpu (the reference), an index that
`kestrel train vq` rewrote: it reads as an IndexIVFPQ with the same structure and the same ids, its
PQ codebooks and/or coarse centroids differ from the old file's (they were learned), and FAISS's own
search distances equal q.(c(d) + decode(code(d))) recomputed in numpy from the centroids, codebooks
and codes FAISS read from the file. Exit 0 and "ok" when all hold, 1 with the reason otherwise."""
import sys

import faiss
import numpy as np


def ivfpq(path):
    ix = faiss.read_index(path)
    return faiss.extract_index_ivf(ix), ix


def main(old_path, new_path):
    old, _ = ivfpq(old_path)
    new, top = ivfpq(new_path)
    old = faiss.downcast_index(old)
    new = faiss.downcast_index(new)
    assert isinstance(new, faiss.IndexIVFPQ), f"{new_path}: {type(new).__name__}, not IndexIVFPQ"
    assert (new.nlist, new.pq.M, new.pq.nbits, new.d) == (old.nlist, old.pq.M, old.pq.nbits, old.d)
    cb_old = faiss.vector_to_array(old.pq.centroids)
    cb_new = faiss.vector_to_array(new.pq.centroids)
    c_old = old.quantizer.reconstruct_n(0, old.nlist)
    c_new = new.quantizer.reconstruct_n(0, new.nlist)
    assert not (np.array_equal(cb_old, cb_new) and np.array_equal(c_old, c_new)), \
        "codebooks and centroids are unchanged"
    ids_old, ids_new, codes, lists = [], [], [], []
    for l in range(new.nlist):
        n = new.invlists.list_size(l)
        ids_new.append(faiss.rev_swig_ptr(new.invlists.get_ids(l), n).copy())
        codes.append(faiss.rev_swig_ptr(new.invlists.get_codes(l), n * new.code_size).copy()
                     .reshape(n, new.code_size))
        lists.append(np.full(n, l))
        m = old.invlists.list_size(l)
        ids_old.append(faiss.rev_swig_ptr(old.invlists.get_ids(l), m).copy())
    ids_new, ids_old = np.concatenate(ids_new), np.concatenate(ids_old)
    assert np.array_equal(np.sort(ids_new), np.sort(ids_old)), "the document ids differ"
    codes, lists = np.concatenate(codes), np.concatenate(lists)
    M, ksub, dsub = new.pq.M, new.pq.ksub, new.pq.dsub
    cb = cb_new.reshape(M, ksub, dsub)
    recon = c_new[lists] + np.concatenate([cb[m][codes[:, m]] for m in range(M)], axis=1)
    g = np.random.default_rng(0)
    q = g.standard_normal((8, new.d)).astype(np.float32)
    new.nprobe = new.nlist
    D, I = new.search(q, 20)
    row = {int(i): r for r, i in enumerate(ids_new)}
    want = np.array([[q[a] @ recon[row[int(i)]] for i in I[a]] for a in range(len(q))])
    err = np.abs(want - D).max()
    assert err < 1e-4, f"FAISS distances differ from q.(c + decode(code)) by {err}"
    print(f"ok: {len(ids_new)} ids, codebook change {np.abs(cb_new - cb_old).max():.3g}, "
          f"centroid change {np.abs(c_new - c_old).max():.3g}, score check max |diff| {err:.2g}")


if __name__ == "__main__":
    try:
        main(sys.argv[1], sys.argv[2])
    except AssertionError as e:
        print(f"vq_faiss_check: {e}")
        sys.exit(1)
