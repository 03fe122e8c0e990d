/* test_faiss.c - the FAISS binding (index/faiss_c.cpp, faiss_ext.h, faiss_blas.c) and index/ann
 * against FAISS itself.
 *
 * Data: the 778 real all-MiniLM-L6-v2 embeddings (../shared/data). References: FAISS 1.15
 * (faiss-cpu, tests/fixtures/fx_faiss.py) wrote index files and search results; Debian's libfaiss
 * 1.7.3 reads those files through our C API and must return the same ids and scores. Tolerances:
 * ids exact; scores 2e-5 absolute (inner products of unit vectors, summed in a different order by
 * the two builds' BLAS/SIMD kernels; the largest difference seen is printed). */
#define _GNU_SOURCE /* memmem */
#include "harness.h"

#include <faiss/c_api/IndexIVF_c.h>
#include <faiss/c_api/Index_c.h>
#include <faiss/c_api/error_c.h>
#include <faiss/c_api/index_factory_c.h>
#include <faiss/c_api/index_io_c.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/file.h"
#include "core/mem.h"
#include "core/npy.h"
#include "index/ann.h"
#include "index/faiss_ext.h"

#define FX "tests/fixtures/faiss"
#define N 778
#define D 384
#define K 10
#define NQ 24
#define SCORE_TOL 2e-5

#if defined(__SANITIZE_ADDRESS__)
/* libfaiss 1.7.3 leaks on its own exception paths, which the bad-input tests take on purpose:
 * read_index builds indexes with raw `new` and does not free the part already read when a later
 * field fails (read_ivfpq's IndexIVFPQ, the quantizer from read_index), and index_factory drops
 * the coarse quantizer parse_coarse_quantizer made when the rest of the string fails to parse.
 * Only the roots are named (what they hold is suppressed with them); read_index itself is not,
 * so an index of ours left unfreed still fails the run. */
const char *__lsan_default_suppressions(void);
const char *__lsan_default_suppressions(void) {
    return "leak:faiss::read_ivfpq\n"
           "leak:parse_coarse_quantizer\n";
}
#endif

static float *g_x;  /* (N, D) */
static kst_npy g_q; /* (NQ, D) */
static char g_tmp[256];

static int setup(void **state) {
    (void)state;
    FILE *fp = fopen(shared_path("minilm-reference-embeddings/embeddings.bin"), "rb");
    if (!fp) return -1;
    g_x = malloc(sizeof(float) * N * D);
    size_t got = fread(g_x, sizeof(float), (size_t)N * D, fp);
    fclose(fp);
    if (got != (size_t)N * D) return -1;
    kst_error err;
    if (kst_npy_read(FX "/queries.npy", &g_q, &err) != KST_OK) return -1;
    snprintf(g_tmp, sizeof g_tmp, "/tmp/kst_test_faiss.XXXXXX");
    return mkdtemp(g_tmp) ? 0 : -1;
}

static int teardown(void **state) {
    (void)state;
    free(g_x);
    kst_npy_free(&g_q);
    char cmd[512];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", g_tmp);
    return system(cmd) == 0 ? 0 : -1;
}

static void load(const char *name, kst_npy *a) {
    kst_error err;
    char path[256];
    snprintf(path, sizeof path, FX "/%s", name);
    assert_ok(kst_npy_read(path, a, &err), &err);
}

/* Ids equal, scores within tol; prints the largest score difference. Two results whose scores
 * tie (within tol) may come in either order: the wanted id must then be in the same row with
 * that score. */
static void assert_results(const char *name, const int64_t *ids, const float *scores,
                           const int64_t *want_ids, const float *want_scores, size_t n) {
    double maxd = 0;
    size_t ties = 0;
    for (size_t i = 0; i < n; i++) {
        if (ids[i] != want_ids[i]) {
            size_t row = i / K * K, j = row;
            while (j < row + K && !(ids[j] == want_ids[i] &&
                                    fabs((double)scores[j] - want_scores[i]) <= SCORE_TOL))
                j++;
            if (j == row + K || fabs((double)scores[i] - want_scores[i]) > SCORE_TOL)
                fail_msg("%s: result %zu (query %zu rank %zu): id %lld score %.7g, FAISS says "
                         "%lld %.7g", name, i, i / K, i % K, (long long)ids[i], scores[i],
                         (long long)want_ids[i], want_scores[i]);
            ties++;
        }
        double d = fabs((double)scores[i] - want_scores[i]);
        if (d > maxd) maxd = d;
    }
    fprintf(stderr, "  %s: %zu ids identical (%zu tied pairs swapped), max |score diff| %.3g\n",
            name, n - ties, ties, maxd);
    assert_close_f32(name, scores, want_scores, n, SCORE_TOL, 0);
}

/* Fraction of the exact top-k (want) found in got, over nq queries. */
static double recall_at_k(const int64_t *got, const int64_t *want, int nq, int k) {
    int hit = 0;
    for (int q = 0; q < nq; q++)
        for (int i = 0; i < k; i++)
            for (int j = 0; j < k; j++)
                if (got[q * k + j] == want[q * k + i]) {
                    hit++;
                    break;
                }
    return (double)hit / (nq * k);
}

static void ids_seq(int64_t *ids, int64_t base, int64_t step) {
    for (int i = 0; i < N; i++) ids[i] = base + step * i;
}

/* ---------------------------------------------------------------------------------------------
 * Search through our C API equals FAISS
 * ------------------------------------------------------------------------------------------- */

static void test_flat_equals_faiss(void **state) {
    (void)state;
    kst_error err;
    kst_npy wi, ws;
    load("flat_ids.npy", &wi);
    load("flat_scores.npy", &ws);
    kst_ann *a;
    assert_ok(kst_ann_create("Flat", D, &a, &err), &err);
    int64_t ids[N];
    ids_seq(ids, 0, 1);
    assert_ok(kst_ann_add(a, N, D, g_x, ids, &err), &err);
    assert_int_equal(kst_ann_count(a), N);
    int64_t got[NQ * K];
    float sc[NQ * K];
    /* 24 queries at once: FAISS's BLAS path (sgemm_ through faiss_blas.c). */
    assert_ok(kst_ann_search(a, NQ, D, g_q.data, K, NULL, sc, got, &err), &err);
    assert_results("flat batched (sgemm_)", got, sc, wi.data, ws.data, NQ * K);
    /* One at a time: FAISS's direct (non-BLAS) path. */
    for (int q = 0; q < NQ; q++)
        assert_ok(kst_ann_search(a, 1, D, (float *)g_q.data + (size_t)q * D, K, NULL,
                                 sc + q * K, got + q * K, &err), &err);
    assert_results("flat one by one", got, sc, wi.data, ws.data, NQ * K);
    kst_ann_free(a);
    kst_npy_free(&wi);
    kst_npy_free(&ws);
}

static void check_ivfpq_file(kst_ann_mmap mode) {
    kst_error err;
    kst_npy wi, ws;
    load("ivfpq_ids.npy", &wi);
    load("ivfpq_scores.npy", &ws);
    kst_ann *a;
    assert_ok(kst_ann_read(FX "/ivfpq.faiss", mode, &a, &err), &err);
    assert_int_equal(kst_ann_dim(a), D);
    assert_int_equal(kst_ann_count(a), N);
    int64_t got[NQ * K];
    float sc[NQ * K];
    kst_ann_search_opts o = {.nprobe = 4};
    assert_ok(kst_ann_search(a, NQ, D, g_q.data, K, &o, sc, got, &err), &err);
    assert_results(mode == KST_ANN_MMAP_ALWAYS ? "ivfpq.faiss (mmap)" : "ivfpq.faiss", got, sc,
                   wi.data, ws.data, NQ * K);
    /* The plain C API path (setting nprobe on the index) gives the same. */
    FaissIndexIVF *ivf = faiss_IndexIVF_cast(kst_ann_faiss(a));
    assert_non_null(ivf);
    faiss_IndexIVF_set_nprobe(ivf, 4);
    int64_t got2[NQ * K];
    float sc2[NQ * K];
    assert_int_equal(faiss_Index_search(kst_ann_faiss(a), NQ, g_q.data, K, sc2, got2), 0);
    assert_memory_equal(got2, got, sizeof got);
    assert_memory_equal(sc2, sc, sizeof sc);
    if (mode == KST_ANN_MMAP_ALWAYS) {
        int64_t id = 5;
        int rc = kst_ann_add(a, 1, D, g_x, &id, &err);
        assert_int_equal(rc, KST_ERR_MISUSE);
        assert_msg_has(err.msg, "read-only");
    }
    kst_ann_free(a);
    kst_npy_free(&wi);
    kst_npy_free(&ws);
}

static void test_ivfpq_file_equals_faiss(void **state) {
    (void)state;
    check_ivfpq_file(KST_ANN_MMAP_NEVER);
    check_ivfpq_file(KST_ANN_MMAP_ALWAYS);
}

static void test_opq_file_equals_faiss(void **state) {
    (void)state;
    kst_error err;
    kst_npy wi, ws, wa;
    load("opq_ids.npy", &wi);
    load("opq_scores.npy", &ws);
    load("opq_A.npy", &wa);
    kst_ann *a;
    assert_ok(kst_ann_read(FX "/opq.faiss", KST_ANN_MMAP_NEVER, &a, &err), &err);
    int64_t got[NQ * K];
    float sc[NQ * K];
    kst_ann_search_opts o = {.nprobe = 16};
    assert_ok(kst_ann_search(a, NQ, D, g_q.data, K, &o, sc, got, &err), &err);
    assert_results("opq.faiss", got, sc, wi.data, ws.data, NQ * K);

    kst_faiss_layout l;
    assert_int_equal(kst_faiss_layout_get(kst_ann_faiss(a), &l), 0);
    assert_int_equal(l.opq_d_in, D);
    assert_int_equal(l.opq_d_out, 64);
    assert_int_equal(l.ivf_d, 64);
    assert_int_equal(l.pq_M, 16);
    float *A = malloc(sizeof(float) * 64 * D);
    assert_int_equal(kst_faiss_opq_matrix_get(kst_ann_faiss(a), A), 0);
    assert_memory_equal(A, wa.data, sizeof(float) * 64 * D);

    /* A stored code decoded by hand, A^T (centroid + codebook rows), equals FAISS's sa_decode
     * of the same code (sa code = 1 byte list number, then the PQ code). */
    float cent[16 * 64], book[16 * 256 * 4];
    assert_int_equal(kst_faiss_ivf_centroids_get(kst_ann_faiss(a), cent), 0);
    assert_int_equal(kst_faiss_pq_codebook_get(kst_ann_faiss(a), book), 0);
    size_t sizes[16];
    assert_int_equal(kst_faiss_ivf_list_sizes(kst_ann_faiss(a), sizes), 0);
    size_t list = 0;
    while (sizes[list] == 0) list++;
    int64_t lid[N];
    uint8_t codes[N * 16];
    assert_int_equal(kst_faiss_ivf_list_get(kst_ann_faiss(a), list, lid, codes), 0);
    float y[64], mine[D], theirs[D];
    for (int j = 0; j < 64; j++) y[j] = (l.by_residual ? cent[list * 64 + j] : 0.0f);
    for (int m = 0; m < 16; m++)
        for (int j = 0; j < 4; j++) y[m * 4 + j] += book[((size_t)m * 256 + codes[m]) * 4 + j];
    for (int i = 0; i < D; i++) {
        double s = 0;
        for (int j = 0; j < 64; j++) s += (double)A[(size_t)j * D + i] * y[j];
        mine[i] = (float)s;
    }
    size_t cs = 0;
    assert_int_equal(faiss_Index_sa_code_size(kst_ann_faiss(a), &cs), 0);
    assert_int_equal(cs, 17);
    uint8_t sa[17];
    sa[0] = (uint8_t)list;
    memcpy(sa + 1, codes, 16);
    assert_int_equal(faiss_Index_sa_decode(kst_ann_faiss(a), 1, sa, theirs), 0);
    assert_close_f32("OPQ decode vs sa_decode", mine, theirs, D, 1e-5, 0);
    /* ...and is close to the vector it encodes (OPQ16 keeps 64 of 384 dimensions: loose). */
    assert_true(cosine_f32(mine, g_x + (size_t)lid[0] * D, D) > 0.6);
    free(A);
    kst_ann_free(a);
    kst_npy_free(&wi);
    kst_npy_free(&ws);
    kst_npy_free(&wa);
}

/* ---------------------------------------------------------------------------------------------
 * Extensions against FAISS's own values
 * ------------------------------------------------------------------------------------------- */

static void test_extensions_read(void **state) {
    (void)state;
    kst_error err;
    kst_npy wc, wpq, wsz, wrec;
    load("ivfpq_centroids.npy", &wc);
    load("ivfpq_pq_ends.npy", &wpq);
    load("ivfpq_list_sizes.npy", &wsz);
    load("ivfpq_recons.npy", &wrec);
    kst_ann *a;
    assert_ok(kst_ann_read(FX "/ivfpq.faiss", KST_ANN_MMAP_NEVER, &a, &err), &err);
    FaissIndex *fi = kst_ann_faiss(a);
    kst_faiss_layout l;
    assert_int_equal(kst_faiss_layout_get(fi, &l), 0);
    assert_int_equal(l.nlist, 16);
    assert_int_equal(l.pq_M, 48);
    assert_int_equal(l.pq_ksub, 256);
    assert_int_equal(l.pq_dsub, 8);
    assert_int_equal(l.code_size, 48);
    assert_int_equal(l.opq_d_out, 0);
    assert_true(l.by_residual);

    float *cent = malloc(sizeof(float) * 16 * D), *book = malloc(sizeof(float) * 48 * 256 * 8);
    assert_int_equal(kst_faiss_ivf_centroids_get(fi, cent), 0);
    assert_memory_equal(cent, wc.data, sizeof(float) * 16 * D);
    assert_int_equal(kst_faiss_pq_codebook_get(fi, book), 0);
    assert_memory_equal(book, wpq.data, sizeof(float) * 256 * 8);
    assert_memory_equal(book + 47 * 256 * 8, (float *)wpq.data + 256 * 8, sizeof(float) * 256 * 8);

    size_t sizes[16], total = 0;
    assert_int_equal(kst_faiss_ivf_list_sizes(fi, sizes), 0);
    FaissIndexIVF *ivf = faiss_IndexIVF_cast(fi);
    for (int i = 0; i < 16; i++) {
        assert_int_equal(sizes[i], ((int64_t *)wsz.data)[i]);
        assert_int_equal(sizes[i], faiss_IndexIVF_get_list_size(ivf, i));
        total += sizes[i];
    }
    assert_int_equal(total, N);

    /* Every id 1000 + 7 row appears once; the codes of rows 0..7 decode (centroid + codebook)
     * to what FAISS's reconstruct() gave. */
    static int seen[N];
    memset(seen, 0, sizeof seen);
    int64_t *lid = malloc(sizeof(int64_t) * N), *cid = malloc(sizeof(int64_t) * N);
    uint8_t *codes = malloc(48 * N);
    for (size_t li = 0; li < 16; li++) {
        assert_int_equal(kst_faiss_ivf_list_get(fi, li, lid, codes), 0);
        faiss_IndexIVF_invlists_get_ids(ivf, li, cid);
        assert_memory_equal(cid, lid, sizeof(int64_t) * sizes[li]);
        for (size_t j = 0; j < sizes[li]; j++) {
            int64_t row = (lid[j] - 1000) / 7;
            assert_true(row >= 0 && row < N && (lid[j] - 1000) % 7 == 0);
            seen[row]++;
            if (row < 8) {
                float rec[D];
                for (int m = 0; m < 48; m++)
                    for (int t = 0; t < 8; t++)
                        rec[m * 8 + t] = cent[li * D + m * 8 + t] +
                                         book[((size_t)m * 256 + codes[j * 48 + m]) * 8 + t];
                assert_close_f32("PQ decode vs FAISS reconstruct", rec,
                                 (float *)wrec.data + row * D, D, 1e-6, 0);
            }
        }
    }
    for (int i = 0; i < N; i++) assert_int_equal(seen[i], 1);
    /* A bad list number is an error, with FAISS's C-API message slot filled. */
    assert_int_not_equal(kst_faiss_ivf_list_get(fi, 16, lid, NULL), 0);
    assert_msg_has(faiss_get_last_error(), "out of range");
    /* Setting on a non-empty index is refused. */
    assert_int_not_equal(kst_faiss_ivf_centroids_set(fi, cent), 0);
    assert_msg_has(faiss_get_last_error(), "empty index");
    free(lid);
    free(cid);
    free(codes);
    free(cent);
    free(book);
    kst_ann_free(a);
    kst_npy_free(&wc);
    kst_npy_free(&wpq);
    kst_npy_free(&wsz);
    kst_npy_free(&wrec);
}

/* Centroids and codebook copied from FAISS's trained index into a fresh, untrained one: adding
 * the same vectors gives FAISS's results again (what Distill-VQ will rely on). */
static void test_extensions_write(void **state) {
    (void)state;
    kst_error err;
    kst_npy wi, ws;
    load("ivfpq_ids.npy", &wi);
    load("ivfpq_scores.npy", &ws);
    kst_ann *ref, *a;
    assert_ok(kst_ann_read(FX "/ivfpq.faiss", KST_ANN_MMAP_NEVER, &ref, &err), &err);
    assert_ok(kst_ann_create("IVF16,PQ48", D, &a, &err), &err);
    assert_false(kst_ann_is_trained(a));
    float *cent = malloc(sizeof(float) * 16 * D), *book = malloc(sizeof(float) * 48 * 256 * 8);
    assert_int_equal(kst_faiss_ivf_centroids_get(kst_ann_faiss(ref), cent), 0);
    assert_int_equal(kst_faiss_pq_codebook_get(kst_ann_faiss(ref), book), 0);
    assert_int_equal(kst_faiss_ivf_centroids_set(kst_ann_faiss(a), cent), 0);
    assert_false(kst_ann_is_trained(a)); /* the codebook is still missing */
    assert_int_equal(kst_faiss_pq_codebook_set(kst_ann_faiss(a), book), 0);
    assert_true(kst_ann_is_trained(a));
    int64_t ids[N];
    ids_seq(ids, 1000, 7);
    assert_ok(kst_ann_add(a, N, D, g_x, ids, &err), &err);
    int64_t got[NQ * K];
    float sc[NQ * K];
    kst_ann_search_opts o = {.nprobe = 4};
    assert_ok(kst_ann_search(a, NQ, D, g_q.data, K, &o, sc, got, &err), &err);
    assert_results("codebooks copied into a new index", got, sc, wi.data, ws.data, NQ * K);
    free(cent);
    free(book);
    kst_ann_free(a);
    kst_ann_free(ref);
    kst_npy_free(&wi);
    kst_npy_free(&ws);
}

/* ---------------------------------------------------------------------------------------------
 * Train, add, remove, write, read through our binding
 * ------------------------------------------------------------------------------------------- */

static void on_note(void *ctx, const char *msg) {
    (*(int *)ctx)++;
    fprintf(stderr, "  note: %s\n", msg);
}

static void search_all(const kst_ann *a, const kst_ann_search_opts *o, int64_t *got, float *sc) {
    kst_error err;
    assert_ok(kst_ann_search(a, NQ, D, g_q.data, K, o, sc, got, &err), &err);
}

static void test_train_add_search_round_trip(void **state) {
    (void)state;
    kst_error err;
    kst_npy wi;
    load("flat_ids.npy", &wi); /* exact top-10, ids = rows */
    int64_t ids[N], got[NQ * K], got2[NQ * K];
    float sc[NQ * K], sc2[NQ * K];
    ids_seq(ids, 0, 1);

    /* IVF64 wants 39 * 64 = 2496 points; 778 give IVF19 and a note. */
    kst_ann *a;
    int notes = 0;
    assert_ok(kst_ann_create("IVF64,PQ48", D, &a, &err), &err);
    kst_ann_set_note_fn(a, on_note, &notes);
    assert_ok(kst_ann_train(a, N, D, g_x, &err), &err);
    assert_string_equal(kst_ann_factory(a), "IVF19,PQ48");
    assert_true(notes >= 1);
    assert_true(kst_ann_is_trained(a));
    assert_ok(kst_ann_add(a, N, D, g_x, ids, &err), &err);
    int np[] = {1, 4, 19};
    for (int i = 0; i < 3; i++) {
        kst_ann_search_opts o = {.nprobe = np[i]};
        search_all(a, &o, got, sc);
        fprintf(stderr, "  IVF19,PQ48 nprobe %2d: recall@10 vs exact %.3f\n", np[i],
                recall_at_k(got, wi.data, NQ, K));
    }
    double r_all = recall_at_k(got, wi.data, NQ, K);
    assert_true(r_all > 0.6); /* PQ48 on 384-d, all lists scanned */
    /* Determinism: the same search twice gives the same bytes. */
    kst_ann_search_opts o19 = {.nprobe = 19};
    search_all(a, &o19, got2, sc2);
    assert_memory_equal(got, got2, sizeof got);

    /* Remove: ten of the ids FAISS ranked first are gone from every result. */
    int64_t gone[10];
    for (int i = 0; i < 10; i++) gone[i] = ((int64_t *)wi.data)[i * K];
    size_t removed = 0;
    assert_ok(kst_ann_remove(a, 10, gone, &removed, &err), &err);
    assert_int_equal(removed, 10);
    assert_int_equal(kst_ann_count(a), N - 10);
    search_all(a, &o19, got, sc);
    for (int i = 0; i < NQ * K; i++)
        for (int j = 0; j < 10; j++) assert_int_not_equal(got[i], gone[j]);

    /* Write and read back (plain and mmap): identical results. */
    char path[512];
    snprintf(path, sizeof path, "%s/ivfpq.faiss", g_tmp);
    assert_ok(kst_ann_write(a, path, &err), &err);
    for (int mode = KST_ANN_MMAP_NEVER; mode <= KST_ANN_MMAP_ALWAYS; mode++) {
        kst_ann *b;
        assert_ok(kst_ann_read(path, (kst_ann_mmap)mode, &b, &err), &err);
        assert_int_equal(kst_ann_count(b), N - 10);
        search_all(b, &o19, got2, sc2);
        assert_memory_equal(got2, got, sizeof got);
        assert_memory_equal(sc2, sc, sizeof sc);
        kst_ann_free(b);
    }
    kst_ann_free(a);

    /* HNSW: recall, ids, no removal. */
    assert_ok(kst_ann_create("HNSW32", D, &a, &err), &err);
    assert_ok(kst_ann_train(a, N, D, g_x, &err), &err);
    assert_ok(kst_ann_add(a, N, D, g_x, ids, &err), &err);
    kst_ann_search_opts oh = {.ef_search = 64};
    search_all(a, &oh, got, sc);
    double rh = recall_at_k(got, wi.data, NQ, K);
    fprintf(stderr, "  HNSW32 efSearch 64: recall@10 vs exact %.3f\n", rh);
    assert_true(rh > 0.9);
    int rc = kst_ann_remove(a, 1, ids, NULL, &err);
    assert_int_equal(rc, KST_ERR_UNSUPPORTED);
    kst_ann_free(a);

    /* Flat with ids: remove, write, read. */
    assert_ok(kst_ann_create("Flat", D, &a, &err), &err);
    ids_seq(ids, 5000, 3);
    assert_ok(kst_ann_add(a, N, D, g_x, ids, &err), &err);
    assert_ok(kst_ann_remove(a, 1, &ids[((int64_t *)wi.data)[0]], &removed, &err), &err);
    assert_int_equal(removed, 1);
    search_all(a, NULL, got, sc);
    assert_int_equal(got[0], 5000 + 3 * ((int64_t *)wi.data)[1]);
    snprintf(path, sizeof path, "%s/flat.faiss", g_tmp);
    assert_ok(kst_ann_write(a, path, &err), &err);
    kst_ann *b;
    assert_ok(kst_ann_read(path, KST_ANN_MMAP_AUTO, &b, &err), &err);
    search_all(b, NULL, got2, sc2);
    assert_memory_equal(got2, got, sizeof got);
    assert_memory_equal(sc2, sc, sizeof sc);
    kst_ann_free(b);
    kst_ann_free(a);
    kst_npy_free(&wi);
}

static void test_opq_train(void **state) {
    (void)state;
    kst_error err;
    kst_npy wi;
    load("flat_ids.npy", &wi);
    kst_ann *a;
    assert_ok(kst_ann_create("OPQ8_32,IVF8,PQ8", D, &a, &err), &err);
    assert_ok(kst_ann_train(a, N, D, g_x, &err), &err); /* sgesvd_ through faiss_blas.c */
    int64_t ids[N], got[NQ * K];
    float sc[NQ * K];
    ids_seq(ids, 0, 1);
    assert_ok(kst_ann_add(a, N, D, g_x, ids, &err), &err);
    kst_ann_search_opts o = {.nprobe = 8};
    search_all(a, &o, got, sc);
    double r = recall_at_k(got, wi.data, NQ, K);
    fprintf(stderr, "  OPQ8_32,IVF8,PQ8 nprobe 8: recall@10 vs exact %.3f\n", r);
    assert_true(r > 0.2);
    /* The learned rotation is orthonormal: rows of A have unit norm. */
    float *A = malloc(sizeof(float) * 32 * D);
    assert_int_equal(kst_faiss_opq_matrix_get(kst_ann_faiss(a), A), 0);
    for (int i = 0; i < 32; i++) {
        double s = 0;
        for (int j = 0; j < D; j++) s += (double)A[i * D + j] * A[i * D + j];
        assert_true(fabs(s - 1) < 1e-4);
    }
    free(A);
    kst_ann_free(a);
    kst_npy_free(&wi);
}

/* ---------------------------------------------------------------------------------------------
 * Factory choice and bad input
 * ------------------------------------------------------------------------------------------- */

static void test_factory_auto(void **state) {
    (void)state;
    char f[64], why[256];
    assert_string_equal(kst_ann_factory_auto(778, D, f, sizeof f, why, sizeof why), "Flat");
    assert_msg_has(why, "778 vectors");
    assert_string_equal(kst_ann_factory_auto(100000, D, f, sizeof f, NULL, 0), "IVF1024,PQ48");
    assert_string_equal(kst_ann_factory_auto(20000, 768, f, sizeof f, NULL, 0), "IVF512,PQ96");
    assert_string_equal(kst_ann_factory_auto(5000000, D, f, sizeof f, why, sizeof why),
                        "OPQ48,IVF8192,PQ48");
    fprintf(stderr, "  5M x 384: %s (%s)\n", f, why);
    assert_string_equal(kst_ann_factory_auto(20000, 100, f, sizeof f, NULL, 0), "IVF512,PQ10");
    /* Every choice is a string FAISS accepts for that dimension. */
    int64_t ns[] = {500, 50000, 2000000};
    int dims[] = {384, 100, 768, 7};
    for (int i = 0; i < 3; i++)
        for (int j = 0; j < 4; j++) {
            kst_error err;
            kst_ann *a;
            kst_ann_factory_auto(ns[i], dims[j], f, sizeof f, NULL, 0);
            assert_ok(kst_ann_create(f, dims[j], &a, &err), &err);
            kst_ann_free(a);
        }
}

static void write_bytes(const char *path, const void *p, size_t n) {
    FILE *fp = fopen(path, "wb");
    assert_non_null(fp);
    if (n) assert_int_equal(fwrite(p, 1, n, fp), n);
    fclose(fp);
}

static void test_bad_inputs(void **state) {
    (void)state;
    kst_error err;
    kst_ann *a = (kst_ann *)1;

    assert_int_equal(kst_ann_create("IVF16,Bogus", D, &a, &err), KST_ERR_INVALID);
    assert_null(a);
    assert_msg_has(err.msg, "could not parse code description Bogus");
    fprintf(stderr, "  unknown factory: %s\n", err.msg);
    assert_int_equal(kst_ann_create("IVF16,PQ7", D, &a, &err), KST_ERR_INVALID);
    assert_msg_has(err.msg, "multiple of the number of subquantizers");
    assert_int_equal(kst_ann_create("Flat", 0, &a, &err), KST_ERR_INVALID);

    /* Raw C API: FAISS's message comes back through faiss_get_last_error. */
    FaissIndex *fi = NULL;
    assert_int_equal(faiss_index_factory(&fi, D, "nonsense", METRIC_INNER_PRODUCT), -2);
    assert_null(fi);
    assert_msg_has(faiss_get_last_error(), "could not parse index string nonsense");
    assert_true(faiss_Index_search(NULL, 1, g_x, 1, NULL, NULL) < 0); /* misuse, not a crash */
    assert_msg_has(faiss_get_last_error(), "index is NULL");

    /* Dimension mismatch and untrained IVF. */
    assert_ok(kst_ann_create("IVF4,PQ48", D, &a, &err), &err);
    int64_t id = 1, lab[K];
    float sc[K];
    assert_int_equal(kst_ann_add(a, 1, D, g_x, &id, &err), KST_ERR_MISUSE);
    assert_int_equal(kst_ann_search(a, 1, D, g_x, K, NULL, sc, lab, &err), KST_ERR_MISUSE);
    assert_msg_has(err.msg, "not trained");
    assert_int_equal(kst_ann_train(a, N, 128, g_x, &err), KST_ERR_SHAPE);
    assert_msg_has(err.msg, "dimension 128");
    /* The C API underneath refuses too, with FAISS's own check. */
    assert_true(faiss_Index_search(kst_ann_faiss(a), 1, g_x, K, sc, lab) < 0);
    fprintf(stderr, "  untrained IVF through the C API: %s\n", faiss_get_last_error());
    /* Too few points for the PQ codebook's 256 centroids: FAISS's message. */
    assert_int_equal(kst_ann_train(a, 100, D, g_x, &err), KST_ERR_INVALID);
    fprintf(stderr, "  100 training points: %s\n", err.msg);
    assert_msg_has(err.msg, "256");
    kst_ann_free(a);

    assert_ok(kst_ann_create("Flat", D, &a, &err), &err);
    assert_int_equal(kst_ann_search(a, 1, 100, g_x, K, NULL, sc, lab, &err), KST_ERR_SHAPE);
    assert_int_equal(kst_ann_search(a, 1, D, g_x, 0, NULL, sc, lab, &err), KST_ERR_INVALID);
    /* An empty index answers with -1 ids. */
    assert_ok(kst_ann_search(a, 1, D, g_x, K, NULL, sc, lab, &err), &err);
    assert_int_equal(lab[0], -1);
    kst_ann_free(a);

    /* Files: missing, empty, truncated, corrupt. */
    char path[512];
    snprintf(path, sizeof path, "%s/missing.faiss", g_tmp);
    assert_int_equal(kst_ann_read(path, KST_ANN_MMAP_AUTO, &a, &err), KST_ERR_IO);
    assert_null(a);
    char *buf;
    size_t len;
    assert_ok(kst_read_file(FX "/ivfpq.faiss", &buf, &len, &err), &err);
    /* ivfpq.faiss: "IwPQ" header (37 bytes), nlist, nprobe, then the quantizer's fourcc at 53;
     * the lists start with "ilar", nlist, code_size, "full", then the vector of list sizes. */
    const char *ilar = memmem(buf, len, "ilar", 4);
    assert_non_null(ilar);
    size_t size0 = (size_t)(ilar - buf) + 32 + 8; /* first list's size (after the count) */
    struct { const char *name; size_t keep; long at; uint64_t put; } cases[] = {
        {"empty", 0, -1, 0}, {"header only", 3, -1, 0},
        {"truncated in the lists", len - 1000, -1, 0}, {"truncated half", len / 2, -1, 0},
        {"bad magic", len, 0, 0x58585858}, {"bad quantizer type", len, 53, 0x58585858},
        {"list size 2^36", len, (long)size0, (uint64_t)1 << 36},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        snprintf(path, sizeof path, "%s/bad%zu.faiss", g_tmp, i);
        char keep[8];
        size_t w = cases[i].at >= 0 && (cases[i].put >> 32) ? 8 : 4;
        if (cases[i].at >= 0) {
            memcpy(keep, buf + cases[i].at, w);
            memcpy(buf + cases[i].at, &cases[i].put, w); /* little-endian, as FAISS writes */
        }
        write_bytes(path, buf, cases[i].keep);
        if (cases[i].at >= 0) memcpy(buf + cases[i].at, keep, w);
        for (int mode = KST_ANN_MMAP_NEVER; mode <= KST_ANN_MMAP_ALWAYS; mode++) {
            int rc = kst_ann_read(path, (kst_ann_mmap)mode, &a, &err);
            if (rc == KST_OK) fail_msg("%s file was read", cases[i].name);
            assert_int_equal(rc, KST_ERR_FORMAT);
            assert_msg_has(err.msg, path);
        }
        fprintf(stderr, "  %s: %s\n", cases[i].name, err.msg);
    }
    kst_free(buf);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_flat_equals_faiss),
        cmocka_unit_test(test_ivfpq_file_equals_faiss),
        cmocka_unit_test(test_opq_file_equals_faiss),
        cmocka_unit_test(test_extensions_read),
        cmocka_unit_test(test_extensions_write),
        cmocka_unit_test(test_train_add_search_round_trip),
        cmocka_unit_test(test_opq_train),
        cmocka_unit_test(test_factory_auto),
        cmocka_unit_test(test_bad_inputs),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
