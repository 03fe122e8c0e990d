/* ann.c - the dense vector index over FAISS's C API (see ann.h). */
#define _POSIX_C_SOURCE 200809L
#include "ann.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <faiss/c_api/AutoTune_c.h>
#include <faiss/c_api/Index_c.h>
#include <faiss/c_api/error_c.h>
#include <faiss/c_api/impl/AuxIndexStructures_c.h>
#include <faiss/c_api/index_factory_c.h>
#include <faiss/c_api/index_io_c.h>

#include "core/check.h"
#include "core/gpu.h"
#include "core/mem.h"
#include "index/ann_gpu.h"
#include "index/faiss_ext.h"

#define FACTORY_MAX 256
#define NOTE_MAX 512

struct kst_ann {
    FaissIndex *index;
    int dim;
    int read_only;             /* IVF lists memory-mapped from the file */
    char factory[FACTORY_MAX]; /* "" when read from a file */
    char note[NOTE_MAX];
    kst_ann_note_fn note_fn;
    void *note_ctx;
    kst_ann_gpu *gpu;          /* GPU copy (kst_ann_set_device), NULL on the CPU */
};

/* ---------------------------------------------------------------------------------------------
 * Helpers
 * ------------------------------------------------------------------------------------------- */

/* Fills err from FAISS's last error on this thread. */
static int faiss_fail(kst_error *err, int code, const char *what) {
    const char *m = faiss_get_last_error();
    return kst_fail(err, code, "%s: %s", what, m ? m : "FAISS failed without a message");
}

static void note(kst_ann *a, const char *fmt, ...) KST_PRINTF(2, 3);
static void note(kst_ann *a, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(a->note, sizeof a->note, fmt, ap);
    va_end(ap);
    if (a->note_fn) a->note_fn(a->note_ctx, a->note);
}

static int layout(const kst_ann *a, kst_faiss_layout *l, kst_error *err) {
    if (kst_faiss_layout_get(a->index, l) != 0) return faiss_fail(err, KST_ERR_INTERNAL, "layout");
    return KST_OK;
}

/* Creates the FAISS index for factory; Flat/HNSW (no IVF, no id map) get "IDMap," in front so
 * that add_with_ids works. */
static int build(const char *factory, int dim, FaissIndex **out, kst_error *err) {
    *out = NULL;
    FaissIndex *ix = NULL;
    if (faiss_index_factory(&ix, dim, factory, METRIC_INNER_PRODUCT) != 0) {
        kst_error e;
        if (kst_faiss_blas_ready(&e) != KST_OK) return kst_fail(err, e.code, "%s", e.msg);
        return faiss_fail(err, KST_ERR_INVALID, factory);
    }
    kst_faiss_layout l;
    if (kst_faiss_layout_get(ix, &l) != 0) {
        faiss_Index_free(ix);
        return faiss_fail(err, KST_ERR_INTERNAL, factory);
    }
    if (l.nlist == 0 && !l.has_id_map) {
        char wrapped[FACTORY_MAX + 8];
        snprintf(wrapped, sizeof wrapped, "IDMap,%s", factory);
        faiss_Index_free(ix);
        ix = NULL;
        if (faiss_index_factory(&ix, dim, wrapped, METRIC_INNER_PRODUCT) != 0)
            return faiss_fail(err, KST_ERR_INVALID, wrapped);
    }
    if (kst_faiss_training_defaults(ix) != 0) {
        faiss_Index_free(ix);
        return faiss_fail(err, KST_ERR_INTERNAL, factory);
    }
    *out = ix;
    return KST_OK;
}

/* Rewrites the number after "IVF" in factory to nlist; 0 when there is no "IVF<digits>". */
static int factory_with_nlist(const char *factory, size_t nlist, char *out, size_t cap) {
    const char *p = strstr(factory, "IVF");
    if (!p || !isdigit((unsigned char)p[3])) return 0;
    const char *q = p + 3;
    while (isdigit((unsigned char)*q)) q++;
    int n = snprintf(out, cap, "%.*sIVF%zu%s", (int)(p - factory), factory, nlist, q);
    return n > 0 && (size_t)n < cap;
}

static int check_dim(const kst_ann *a, int dim, const char *what, kst_error *err) {
    if (dim != a->dim)
        return kst_fail(err, KST_ERR_SHAPE, "%s: vectors have dimension %d, the index %d", what,
                        dim, a->dim);
    return KST_OK;
}

/* ---------------------------------------------------------------------------------------------
 * Factory choice
 * ------------------------------------------------------------------------------------------- */

/* Sub-quantizers for dim: the divisor of dim nearest dim / 8 (8 dimensions per byte of code). */
static int pq_m_for(int dim) {
    int target = dim / 8 > 0 ? dim / 8 : 1, best = 1;
    for (int m = 1; m <= dim; m++)
        if (dim % m == 0 && abs(m - target) < abs(best - target)) best = m;
    return best;
}

static size_t pow2_near(double v) {
    size_t p = 1;
    while ((double)(p * 2) <= v * 1.41421356) p *= 2;
    return p;
}

const char *kst_ann_factory_auto(int64_t n, int dim, char *factory, size_t cap, char *why,
                                 size_t why_cap) {
    char w[256];
    if (n < 10000 || dim < 1) {
        snprintf(factory, cap, "Flat");
        snprintf(w, sizeof w,
                 "%lld vectors (%.1f MB of floats) are scanned exactly faster than an IVF index "
                 "can be trained well (it wants %d points per list)",
                 (long long)n, (double)n * dim * 4 / 1e6, KST_ANN_POINTS_PER_CENTROID);
    } else {
        int m = pq_m_for(dim);
        size_t nlist = pow2_near(4.0 * sqrt((double)n));
        while (nlist > 1 && (int64_t)nlist * KST_ANN_POINTS_PER_CENTROID > n) nlist /= 2;
        if (n < 1000000) {
            snprintf(factory, cap, "IVF%zu,PQ%d", nlist, m);
            snprintf(w, sizeof w,
                     "%lld vectors: IVF with ~4*sqrt(n) = %zu lists, PQ with %d one-byte codes "
                     "(%d dimensions each) keeps %d bytes per vector",
                     (long long)n, nlist, m, dim / m, m);
        } else {
            snprintf(factory, cap, "OPQ%d,IVF%zu,PQ%d", m, nlist, m);
            snprintf(w, sizeof w,
                     "%lld vectors: OPQ rotation before IVF%zu,PQ%d lowers PQ error at this "
                     "scale, %d bytes per vector",
                     (long long)n, nlist, m, m);
        }
    }
    if (why && why_cap) snprintf(why, why_cap, "%s", w);
    return factory;
}

/* ---------------------------------------------------------------------------------------------
 * Life cycle
 * ------------------------------------------------------------------------------------------- */

int kst_ann_create(const char *factory, int dim, kst_ann **out, kst_error *err) {
    *out = NULL;
    if (!factory || !*factory) return kst_fail(err, KST_ERR_INVALID, "empty factory string");
    if (strlen(factory) >= FACTORY_MAX - 8)
        return kst_fail(err, KST_ERR_INVALID, "factory string longer than %d bytes",
                        FACTORY_MAX - 8);
    if (dim < 1) return kst_fail(err, KST_ERR_INVALID, "dimension %d: must be at least 1", dim);
    kst_ann *a = kst_calloc(1, sizeof *a, "kst_ann", err);
    if (!a) return KST_ERR_NOMEM;
    int rc = build(factory, dim, &a->index, err);
    if (rc != KST_OK) {
        kst_free(a);
        return rc;
    }
    a->dim = dim;
    snprintf(a->factory, sizeof a->factory, "%s", factory);
    *out = a;
    return KST_OK;
}

/* 1 when the file's first index header may hold IVF lists (see kst_ann_read). */
static int ivf_like(const char *path) {
    char h[4] = {0};
    FILE *fp = fopen(path, "rb");
    if (!fp) return 0;
    size_t got = fread(h, 1, 4, fp);
    fclose(fp);
    if (got != 4) return 0;
    return (h[0] == 'I' && h[1] == 'w') || !memcmp(h, "IxPT", 4) || !memcmp(h, "IxMp", 4) ||
           !memcmp(h, "IxM2", 4);
}

int kst_ann_read(const char *path, kst_ann_mmap mmap, kst_ann **out, kst_error *err) {
    *out = NULL;
    struct stat st;
    if (stat(path, &st) != 0)
        return kst_fail(err, KST_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    if (!S_ISREG(st.st_mode)) return kst_fail(err, KST_ERR_IO, "%s: not a regular file", path);
    int use_mmap = mmap == KST_ANN_MMAP_ALWAYS ||
                   (mmap == KST_ANN_MMAP_AUTO && (int64_t)st.st_size >= KST_ANN_MMAP_MIN);
    kst_ann *a = kst_calloc(1, sizeof *a, "kst_ann", err);
    if (!a) return KST_ERR_NOMEM;
    /* FAISS sizes each inverted list from the file and allocates (zero-filled) before reading
     * it, so a corrupt size can ask for up to 2^40 entries: std::bad_alloc at best, the OOM
     * killer or an ASan abort at worst. A memory-mapped read allocates nothing for the lists
     * and the binding checks their extents against the file size, so IVF files ("Iw..", or
     * under an IDMap/pre-transform) are first opened that way: cheap, it skips the list data. */
    if (!use_mmap && ivf_like(path)) {
        FaissIndex *probe = NULL;
        if (faiss_read_index_fname(path, FAISS_IO_FLAG_MMAP, &probe) != 0) {
            kst_free(a);
            return faiss_fail(err, KST_ERR_FORMAT, path);
        }
        faiss_Index_free(probe);
    }
    if (faiss_read_index_fname(path, use_mmap ? FAISS_IO_FLAG_MMAP : 0, &a->index) != 0) {
        kst_error e;
        int rc = kst_faiss_blas_ready(&e) != KST_OK
                         ? kst_fail(err, e.code, "%s", e.msg)
                         : faiss_fail(err, KST_ERR_FORMAT, path);
        kst_free(a);
        return rc;
    }
    kst_faiss_layout l;
    int rc = layout(a, &l, err);
    if (rc == KST_OK && l.metric != METRIC_INNER_PRODUCT)
        rc = kst_fail(err, KST_ERR_FORMAT, "%s: metric %d, Kestrel indexes use inner product (%d)",
                      path, l.metric, (int)METRIC_INNER_PRODUCT);
    if (rc != KST_OK) {
        kst_ann_free(a);
        return rc;
    }
    a->dim = l.d;
    a->read_only = use_mmap && l.nlist > 0;
    *out = a;
    return KST_OK;
}

int kst_ann_write(const kst_ann *a, const char *path, kst_error *err) {
    char tmp[4096];
    if ((size_t)snprintf(tmp, sizeof tmp, "%s.tmp.XXXXXX", path) >= sizeof tmp)
        return kst_fail(err, KST_ERR_INVALID, "%s: path too long", path);
    int fd = mkstemp(tmp);
    if (fd < 0) return kst_fail(err, KST_ERR_IO, "%s: cannot create: %s", tmp, strerror(errno));
    FILE *fp = fdopen(fd, "wb");
    if (!fp) {
        int e = errno;
        close(fd);
        unlink(tmp);
        return kst_fail(err, KST_ERR_IO, "%s: %s", tmp, strerror(e));
    }
    int rc = KST_OK;
    if (faiss_write_index(a->index, fp) != 0) rc = faiss_fail(err, KST_ERR_IO, tmp);
    if (rc == KST_OK && (fflush(fp) != 0 || fsync(fileno(fp)) != 0))
        rc = kst_fail(err, KST_ERR_IO, "%s: cannot flush: %s", tmp, strerror(errno));
    if (fclose(fp) != 0 && rc == KST_OK)
        rc = kst_fail(err, KST_ERR_IO, "%s: cannot close: %s", tmp, strerror(errno));
    if (rc == KST_OK && rename(tmp, path) != 0)
        rc = kst_fail(err, KST_ERR_IO, "%s: cannot replace: %s", path, strerror(errno));
    if (rc != KST_OK) unlink(tmp);
    return rc;
}

int kst_ann_clone_empty(const kst_ann *a, kst_ann **out, kst_error *err) {
    *out = NULL;
    kst_ann *c = kst_calloc(1, sizeof *c, "kst_ann", err);
    if (!c) return KST_ERR_NOMEM;
    if (kst_faiss_clone_empty(a->index, &c->index) != 0) {
        kst_free(c);
        return faiss_fail(err, KST_ERR_UNSUPPORTED, "clone");
    }
    c->dim = a->dim;
    snprintf(c->factory, sizeof c->factory, "%s", a->factory);
    *out = c;
    return KST_OK;
}

void kst_ann_free(kst_ann *a) {
    if (!a) return;
    kst_ann_gpu_free(a->gpu);
    if (a->index) faiss_Index_free(a->index);
    kst_free(a);
}

void kst_ann_set_note_fn(kst_ann *a, kst_ann_note_fn fn, void *ctx) {
    a->note_fn = fn;
    a->note_ctx = ctx;
}
const char *kst_ann_note(const kst_ann *a) { return a->note; }
const char *kst_ann_factory(const kst_ann *a) { return a->factory; }
int kst_ann_dim(const kst_ann *a) { return a->dim; }
int64_t kst_ann_count(const kst_ann *a) { return faiss_Index_ntotal(a->index); }
int kst_ann_is_trained(const kst_ann *a) { return faiss_Index_is_trained(a->index); }
struct FaissIndex_H *kst_ann_faiss(kst_ann *a) { return a->index; }

/* ---------------------------------------------------------------------------------------------
 * Train, add, remove, search
 * ------------------------------------------------------------------------------------------- */

int kst_ann_train(kst_ann *a, int64_t n, int dim, const float *x, kst_error *err) {
    int rc = check_dim(a, dim, "train", err);
    if (rc != KST_OK) return rc;
    kst_faiss_layout l;
    KST_TRY(layout(a, &l, err));
    if (l.is_trained && l.nlist == 0 && l.pq_M == 0) return KST_OK; /* Flat, HNSW */
    if (l.ntotal > 0)
        return kst_fail(err, KST_ERR_MISUSE, "train: the index already holds %lld vectors",
                        (long long)l.ntotal);
    if (n < 1) return kst_fail(err, KST_ERR_INVALID, "train: no training vectors");

    if (l.nlist > 0 && n < (int64_t)l.nlist * KST_ANN_POINTS_PER_CENTROID) {
        size_t nlist = (size_t)(n / KST_ANN_POINTS_PER_CENTROID);
        if (nlist < 1) nlist = 1;
        char f[FACTORY_MAX];
        if (a->factory[0] && factory_with_nlist(a->factory, nlist, f, sizeof f)) {
            FaissIndex *ix = NULL;
            KST_TRY(build(f, a->dim, &ix, err));
            note(a, "%lld training points are too few for %zu IVF lists (FAISS wants %d per list): "
                    "using %s instead of %s",
                 (long long)n, l.nlist, KST_ANN_POINTS_PER_CENTROID, f, a->factory);
            faiss_Index_free(a->index);
            a->index = ix;
            snprintf(a->factory, sizeof a->factory, "%s", f);
            KST_TRY(layout(a, &l, err));
        } else {
            note(a, "%lld training points are few for %zu IVF lists (FAISS wants %d per list)",
                 (long long)n, l.nlist, KST_ANN_POINTS_PER_CENTROID);
        }
    }
    if (l.pq_M > 0 && n < (int64_t)l.pq_ksub * KST_ANN_POINTS_PER_CENTROID)
        note(a, "%lld training points are few for PQ codebooks of %zu centroids (FAISS wants %d "
                "per centroid): codes will be coarser than they could be",
             (long long)n, l.pq_ksub, KST_ANN_POINTS_PER_CENTROID);

    /* An evenly spaced sample of at most 256 points per centroid, FAISS's own k-means cap. */
    size_t k = l.nlist > l.pq_ksub ? l.nlist : l.pq_ksub;
    int64_t cap = (int64_t)(k ? k : 256) * 256;
    if (cap < 65536) cap = 65536; /* OPQ trains on up to 256 * 256 points */
    const float *train = x;
    float *sample = NULL;
    int64_t ns = n;
    if (n > cap) {
        ns = cap;
        sample = kst_malloc((size_t)ns * (size_t)dim, sizeof(float), "training sample", err);
        if (!sample) return KST_ERR_NOMEM;
        for (int64_t i = 0; i < ns; i++)
            memcpy(sample + (size_t)i * dim, x + (size_t)(i * n / ns) * dim,
                   (size_t)dim * sizeof(float));
        train = sample;
    }
    if (faiss_Index_train(a->index, ns, train) != 0) rc = faiss_fail(err, KST_ERR_INVALID, "train");
    kst_free(sample);
done:
    return rc;
}

int kst_ann_add(kst_ann *a, int64_t n, int dim, const float *x, const int64_t *ids,
                kst_error *err) {
    int rc = check_dim(a, dim, "add", err);
    if (rc != KST_OK) return rc;
    if (a->read_only)
        return kst_fail(err, KST_ERR_MISUSE, "add: the index was opened memory-mapped (read-only)");
    if (!faiss_Index_is_trained(a->index))
        return kst_fail(err, KST_ERR_MISUSE, "add: the index is not trained (call kst_ann_train)");
    if (n == 0) return KST_OK;
    if (n < 0 || !x || !ids) return kst_fail(err, KST_ERR_INVALID, "add: no vectors or no ids");
    if (faiss_Index_add_with_ids(a->index, n, x, ids) != 0)
        return faiss_fail(err, KST_ERR_INVALID, "add");
    kst_ann_gpu_stale(a->gpu);
    return KST_OK;
}

int kst_ann_remove(kst_ann *a, size_t n, const int64_t *ids, size_t *removed, kst_error *err) {
    if (removed) *removed = 0;
    if (a->read_only)
        return kst_fail(err, KST_ERR_MISUSE,
                        "remove: the index was opened memory-mapped (read-only)");
    if (n == 0) return KST_OK;
    kst_faiss_layout l;
    int rc = layout(a, &l, err);
    if (rc != KST_OK) return rc;
    if (l.is_hnsw)
        return kst_fail(err, KST_ERR_UNSUPPORTED,
                        "remove: FAISS cannot remove vectors from an HNSW graph; rebuild the index");
    FaissIDSelectorBatch *sel = NULL;
    if (faiss_IDSelectorBatch_new(&sel, n, ids) != 0) return faiss_fail(err, KST_ERR_NOMEM, "remove");
    if (faiss_Index_remove_ids(a->index, (FaissIDSelector *)sel, removed) != 0)
        rc = faiss_fail(err, KST_ERR_UNSUPPORTED, "remove");
    faiss_IDSelector_free((FaissIDSelector *)sel);
    kst_ann_gpu_stale(a->gpu);
    return rc;
}

int kst_ann_search(const kst_ann *a, int64_t nq, int dim, const float *q, int64_t k,
                   const kst_ann_search_opts *opts, float *scores, int64_t *ids, kst_error *err) {
    int rc = check_dim(a, dim, "search", err);
    if (rc != KST_OK) return rc;
    if (k < 1) return kst_fail(err, KST_ERR_INVALID, "search: k = %lld, must be at least 1",
                               (long long)k);
    if (!faiss_Index_is_trained(a->index))
        return kst_fail(err, KST_ERR_MISUSE,
                        "search: the index is not trained (call kst_ann_train, then add)");
    if (nq == 0) return KST_OK;
    if (a->gpu)
        return kst_ann_gpu_search(a->gpu, a->index, nq, q, k, opts && opts->nprobe > 0 ? opts->nprobe : 0,
                                  scores, ids, err);
    size_t nprobe = opts && opts->nprobe > 0 ? (size_t)opts->nprobe : 0;
    int ef = opts && opts->ef_search > 0 ? opts->ef_search : 0;
    if (kst_faiss_search(a->index, nq, q, k, nprobe, ef, scores, ids) != 0)
        return faiss_fail(err, KST_ERR_INVALID, "search");
    return KST_OK;
}

int kst_ann_set_device(kst_ann *a, int device, int fp16, kst_error *err) {
    kst_ann_gpu_free(a->gpu);
    a->gpu = NULL;
    if (device == 0) return KST_OK;
    char why[NOTE_MAX];
    if (!kst_ann_gpu_supported(a->index, why, sizeof why)) {
        int rc = kst_gpu_check(err);
        if (rc != KST_OK) return rc;
        note(a, "%s", why);
        return KST_OK;
    }
    return kst_ann_gpu_open(a->index, fp16, &a->gpu, err);
}

int kst_ann_on_gpu(const kst_ann *a) { return a->gpu != NULL; }
