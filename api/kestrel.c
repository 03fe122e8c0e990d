/* kestrel.c - the public API (kestrel.h) over the encoders. */
#include "api/kestrel.h"

#include <stdio.h>
#include <string.h>

#include "core/blas.h"
#include "core/check.h"
#include "core/mem.h"
#include "core/ops.h"
#include "encoders/encoder.h"

struct kst_model {
    kst_encoder *enc;
};

const char *kst_version(void) { return KESTREL_VERSION_STRING; }

const char *kst_build_info(void) {
    static char buf[128];
    snprintf(buf, sizeof buf, "OpenBLAS %s kernels%s", kst_blas_core(),
#ifdef KST_CUDA
             ", CUDA"
#else
             ""
#endif
    );
    return buf;
}

kst_model_opts kst_model_opts_default(void) {
    kst_model_opts o = {KST_MODEL_AUTO, 0};
    return o;
}

kst_encode_opts kst_encode_opts_default(void) {
    kst_encode_opts o = {0, 0, 32};
    return o;
}

static kst_role role_of(kst_model_kind k) {
    switch (k) {
    case KST_MODEL_DENSE: return KST_ROLE_DENSE;
    case KST_MODEL_COLBERT: return KST_ROLE_COLBERT;
    case KST_MODEL_CROSS: return KST_ROLE_CROSS;
    default: return KST_ROLE_AUTO;
    }
}

static kst_model_kind kind_of(kst_role r) {
    switch (r) {
    case KST_ROLE_DENSE: return KST_MODEL_DENSE;
    case KST_ROLE_COLBERT: return KST_MODEL_COLBERT;
    case KST_ROLE_CROSS: return KST_MODEL_CROSS;
    default: return KST_MODEL_AUTO;
    }
}

int kst_model_open(const char *dir, const kst_model_opts *opts, kst_model **out, kst_error *err) {
    if (!out) return kst_fail(err, KST_ERR_MISUSE, "kst_model_open: out is NULL");
    *out = NULL;
    if (!dir) return kst_fail(err, KST_ERR_MISUSE, "kst_model_open: dir is NULL");
    kst_model_opts o = opts ? *opts : kst_model_opts_default();
    if (o.kind < KST_MODEL_AUTO || o.kind > KST_MODEL_CROSS)
        return kst_fail(err, KST_ERR_INVALID, "kst_model_open: unknown kind %d", (int)o.kind);
    if (o.num_threads > 0) kst_set_num_threads(o.num_threads);
    kst_model *m = kst_calloc(1, sizeof *m, "model", err);
    if (!m) return KST_ERR_NOMEM;
    int rc = kst_encoder_open(dir, role_of(o.kind), &m->enc, err);
    if (rc != KST_OK) {
        kst_free(m);
        return rc;
    }
    *out = m;
    return KST_OK;
}

void kst_model_close(kst_model *m) {
    if (!m) return;
    kst_encoder_free(m->enc);
    kst_free(m);
}

kst_model_kind kst_model_kind_of(const kst_model *m) { return m ? kind_of(m->enc->role) : KST_MODEL_AUTO; }
const char *kst_model_kind_name(kst_model_kind k) { return kst_role_name(role_of(k)); }
size_t kst_model_dim(const kst_model *m) {
    return m && m->enc->role != KST_ROLE_CROSS ? m->enc->dim : 0;
}
size_t kst_model_num_scores(const kst_model *m) { return m ? kst_encoder_num_scores(m->enc) : 0; }
size_t kst_model_max_len(const kst_model *m) {
    if (!m) return 0;
    return m->enc->role == KST_ROLE_COLBERT ? m->enc->doc_maxlen : m->enc->max_len;
}

static int check_texts(const char *fn, const void *texts, size_t n, kst_error *err) {
    if (n && !texts) return kst_fail(err, KST_ERR_MISUSE, "%s: texts is NULL", fn);
    return KST_OK;
}

int kst_model_embed(kst_model *m, const char *const *texts, const size_t *lens, size_t n,
                    const kst_encode_opts *opts, float *out, kst_error *err) {
    if (!m || (n && !out)) return kst_fail(err, KST_ERR_MISUSE, "kst_model_embed: NULL model or output");
    int rc = check_texts("kst_model_embed", texts, n, err);
    if (rc != KST_OK) return rc;
    kst_encode_opts o = opts ? *opts : kst_encode_opts_default();
    return kst_encoder_embed(m->enc, texts, lens, n, o.is_query, o.max_len, o.batch_size, out, err);
}

int kst_model_embed_tokens(kst_model *m, const char *const *texts, const size_t *lens, size_t n,
                           const kst_encode_opts *opts, kst_token_vectors **out, kst_error *err) {
    if (!m || !out) return kst_fail(err, KST_ERR_MISUSE, "kst_model_embed_tokens: NULL model or output");
    *out = NULL;
    int rc = check_texts("kst_model_embed_tokens", texts, n, err);
    if (rc != KST_OK) return rc;
    kst_encode_opts o = opts ? *opts : kst_encode_opts_default();
    kst_token_vectors *v = kst_calloc(1, sizeof *v, "token vectors", err);
    if (!v) return KST_ERR_NOMEM;
    v->n = n;
    v->dim = m->enc->dim;
    v->offsets = kst_malloc(n + 1, sizeof *v->offsets, "token offsets", err);
    if (!v->offsets) {
        kst_free(v);
        return KST_ERR_NOMEM;
    }
    rc = kst_encoder_embed_tokens(m->enc, texts, lens, n, o.is_query, o.max_len, o.batch_size,
                                  &v->vectors, &v->total, v->offsets, err);
    if (rc != KST_OK) {
        kst_token_vectors_free(v);
        return rc;
    }
    *out = v;
    return KST_OK;
}

void kst_token_vectors_free(kst_token_vectors *v) {
    if (!v) return;
    kst_free(v->vectors);
    kst_free(v->offsets);
    kst_free(v);
}

int kst_model_score(kst_model *m, const char *const *queries, const size_t *qlens,
                    const char *const *passages, const size_t *plens, size_t n,
                    const kst_encode_opts *opts, float *out, kst_error *err) {
    if (!m || (n && (!out || !queries || !passages)))
        return kst_fail(err, KST_ERR_MISUSE, "kst_model_score: NULL model, texts or output");
    kst_encode_opts o = opts ? *opts : kst_encode_opts_default();
    return kst_encoder_score(m->enc, queries, qlens, passages, plens, n, o.max_len, o.batch_size, out, err);
}

int kst_model_tokenize(kst_model *m, const char *text, size_t len, const char *passage,
                       size_t plen, const kst_encode_opts *opts, int32_t **ids,
                       int32_t **type_ids, size_t *n, kst_error *err) {
    if (!m || !text || !ids || !n) return kst_fail(err, KST_ERR_MISUSE, "kst_model_tokenize: NULL argument");
    *ids = NULL;
    if (type_ids) *type_ids = NULL;
    kst_encode_opts o = opts ? *opts : kst_encode_opts_default();
    kst_ids v = {0};
    int rc = kst_encoder_tokenize(m->enc, text, len, passage, plen, o.is_query, o.max_len, &v, err);
    if (rc != KST_OK) {
        kst_ids_free(&v);
        return rc;
    }
    *ids = v.ids;
    *n = v.len;
    if (type_ids) *type_ids = v.type_ids;
    else kst_free(v.type_ids);
    return KST_OK;
}

void kst_ids_array_free(int32_t *ids) { kst_free(ids); }
