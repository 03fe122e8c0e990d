/* encoder.c - checkpoint folders to vectors and scores: role detection, batching and heads. */
#include "encoder.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "core/blas.h"
#include "encoders/bert_gpu.h"
#include "core/check.h"
#include "core/ops_backward.h"
#include "core/file.h"
#include "core/json.h"
#include "core/mem.h"

#define PATH_CAP 4096

const char *kst_role_name(kst_role r) {
    switch (r) {
    case KST_ROLE_DENSE: return "dense";
    case KST_ROLE_COLBERT: return "colbert";
    case KST_ROLE_CROSS: return "cross";
    default: return "auto";
    }
}

/* ------------------------------------------------------------------------------------------ */
/* role detection and head configuration */

/* 1 when config.json's "architectures" names a *ForSequenceClassification class. */
static int is_sequence_classifier(const char *dir) {
    char path[PATH_CAP];
    if (kst_path_join(path, sizeof path, dir, "config.json", NULL) != KST_OK) return 0;
    cJSON *j = NULL;
    if (kst_json_load(path, &j, NULL) != KST_OK) return 0;
    int yes = 0;
    const cJSON *arch = cJSON_GetObjectItemCaseSensitive(j, "architectures");
    const cJSON *a;
    cJSON_ArrayForEach(a, arch) {
        if (cJSON_IsString(a) && strstr(a->valuestring, "ForSequenceClassification")) yes = 1;
    }
    cJSON_Delete(j);
    return yes;
}

static kst_role detect_role(const char *dir) {
    char path[PATH_CAP];
    if (kst_path_join(path, sizeof path, dir, "modules.json", NULL) == KST_OK && kst_path_exists(path))
        return KST_ROLE_DENSE;
    if (kst_path_join(path, sizeof path, dir, "artifact.metadata", NULL) == KST_OK && kst_path_exists(path))
        return KST_ROLE_COLBERT;
    if (is_sequence_classifier(dir)) return KST_ROLE_CROSS;
    return KST_ROLE_DENSE;
}

/* Maps a pooling mode name (sentence-transformers >= 5 writes "pooling_mode": "mean"). */
static int pool_mode_of(const char *name) {
    if (strcmp(name, "cls") == 0) return KST_POOL_CLS;
    if (strcmp(name, "max") == 0) return KST_POOL_MAX;
    if (strcmp(name, "mean") == 0) return KST_POOL_MEAN;
    if (strcmp(name, "mean_sqrt_len_tokens") == 0) return KST_POOL_MEAN_SQRT;
    return -1;
}

/* Reads sentence-transformers' Pooling config: the older boolean keys, or "pooling_mode" as a
 * name or a list of names. */
static int load_pooling(kst_encoder *e, const char *path, kst_error *err) {
    cJSON *j = NULL;
    int rc = kst_json_load(path, &j, err);
    if (rc != KST_OK) return rc;
    static const struct { const char *key; unsigned mode; } keys[] = {
        {"pooling_mode_cls_token", KST_POOL_CLS},
        {"pooling_mode_max_tokens", KST_POOL_MAX},
        {"pooling_mode_mean_tokens", KST_POOL_MEAN},
        {"pooling_mode_mean_sqrt_len_tokens", KST_POOL_MEAN_SQRT}};
    e->pool_modes = 0;
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) {
        int on = 0;
        KST_TRY(kst_json_bool(j, keys[i].key, &on, path, err));
        if (on) e->pool_modes |= keys[i].mode;
    }
    const char *unsupported[] = {"pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken"};
    for (size_t i = 0; i < 2; i++) {
        int on = 0;
        KST_TRY(kst_json_bool(j, unsupported[i], &on, path, err));
        if (on) {
            rc = kst_fail(err, KST_ERR_UNSUPPORTED, "%s: %s is not supported (use cls, mean, max or mean_sqrt_len_tokens)",
                          path, unsupported[i]);
            goto done;
        }
    }
    const cJSON *pm = cJSON_GetObjectItemCaseSensitive(j, "pooling_mode");
    const cJSON *one = NULL;
    if (cJSON_IsString(pm) || cJSON_IsArray(pm)) {
        if (cJSON_IsString(pm)) one = pm;
        for (const cJSON *v = one ? one : pm->child; v; v = one ? NULL : v->next) {
            int mode = cJSON_IsString(v) ? pool_mode_of(v->valuestring) : -1;
            if (mode < 0) {
                rc = kst_fail(err, KST_ERR_UNSUPPORTED, "%s: pooling_mode \"%s\" (expected cls, mean, max or mean_sqrt_len_tokens)",
                              path, cJSON_IsString(v) ? v->valuestring : "?");
                goto done;
            }
            e->pool_modes |= (unsigned)mode;
            if (one) break;
        }
    } else if (pm && !cJSON_IsNull(pm)) {
        rc = kst_fail(err, KST_ERR_FORMAT, "%s: \"pooling_mode\" must be a string or a list of strings", path);
        goto done;
    }
    if (!e->pool_modes) {
        rc = kst_fail(err, KST_ERR_FORMAT, "%s: no pooling mode is enabled", path);
        goto done;
    }
done:
    cJSON_Delete(j);
    return rc;
}

/* Reads a sentence-transformers Dense module's config into the model config. */
static int load_dense_config(kst_bert_config *cfg, const char *path, kst_error *err) {
    cJSON *j = NULL;
    int rc = kst_json_load(path, &j, err);
    if (rc != KST_OK) return rc;
    long in = 0, outf = 0;
    int bias = 1;
    const char *act = "torch.nn.modules.activation.Tanh";
    KST_TRY(kst_json_int(j, "in_features", &in, path, err));
    KST_TRY(kst_json_int(j, "out_features", &outf, path, err));
    KST_TRY(kst_json_bool(j, "bias", &bias, path, err));
    KST_TRY(kst_json_str(j, "activation_function", &act, path, err));
    if (in <= 0 || outf <= 0) {
        rc = kst_fail(err, KST_ERR_FORMAT, "%s: in_features and out_features must be positive", path);
        goto done;
    }
    if (!bias) {
        rc = kst_fail(err, KST_ERR_UNSUPPORTED, "%s: Dense without bias is not supported", path);
        goto done;
    }
    const char *last = strrchr(act, '.');
    last = last ? last + 1 : act;
    if (strcmp(last, "Tanh") == 0) cfg->dense_act = KST_ACT_TANH;
    else if (strcmp(last, "Identity") == 0) cfg->dense_act = KST_ACT_IDENTITY;
    else if (strcmp(last, "ReLU") == 0) cfg->dense_act = KST_ACT_RELU;
    else if (strcmp(last, "GELU") == 0) cfg->dense_act = KST_ACT_GELU;
    else {
        rc = kst_fail(err, KST_ERR_UNSUPPORTED, "%s: activation_function \"%s\" (expected Tanh, Identity, ReLU or GELU)",
                      path, act);
        goto done;
    }
    cfg->dense_in = (size_t)in;
    cfg->dense_out = (size_t)outf;
done:
    cJSON_Delete(j);
    return rc;
}

/* The folder of the sentence-transformers module whose type or folder name mentions `what`. */
static const char *st_module_path(const cJSON *modules, const char *what) {
    const cJSON *m;
    cJSON_ArrayForEach(m, modules) {
        const cJSON *type = cJSON_GetObjectItemCaseSensitive(m, "type");
        const cJSON *path = cJSON_GetObjectItemCaseSensitive(m, "path");
        const char *t = cJSON_IsString(type) ? type->valuestring : "";
        const char *p = cJSON_IsString(path) ? path->valuestring : NULL;
        if (!p) continue;
        if (strstr(t, what) || strstr(p, what)) return p;
    }
    return NULL;
}

static int setup_dense_st(kst_encoder *e, kst_bert_config *cfg, char *model_dir, size_t cap,
                          char *dense_dir, kst_error *err) {
    char path[PATH_CAP];
    cJSON *mods = NULL;
    int rc = KST_OK;
    KST_TRY(kst_path_join(path, sizeof path, e->dir, "modules.json", err));
    KST_TRY(kst_json_load(path, &mods, err));
    if (!cJSON_IsArray(mods)) {
        rc = kst_fail(err, KST_ERR_FORMAT, "%s: expected a JSON array of modules", path);
        goto done;
    }
    const char *tp = st_module_path(mods, "Transformer");
    if (!tp) {
        const cJSON *first = cJSON_GetArrayItem(mods, 0);
        const cJSON *p0 = first ? cJSON_GetObjectItemCaseSensitive(first, "path") : NULL;
        tp = cJSON_IsString(p0) ? p0->valuestring : "";
    }
    if (*tp) KST_TRY(kst_path_join(model_dir, cap, e->dir, tp, err));
    else snprintf(model_dir, cap, "%s", e->dir);
    const char *pp = st_module_path(mods, "Pooling");
    if (!pp) {
        rc = kst_fail(err, KST_ERR_FORMAT, "%s: no Pooling module", path);
        goto done;
    }
    char sub[PATH_CAP];
    KST_TRY(kst_path_join(sub, sizeof sub, e->dir, pp, err));
    KST_TRY(kst_path_join(path, sizeof path, sub, "config.json", err));
    KST_TRY(load_pooling(e, path, err));
    const char *dp = st_module_path(mods, "Dense");
    if (dp) {
        KST_TRY(kst_path_join(dense_dir, PATH_CAP, e->dir, dp, err));
        KST_TRY(kst_path_join(path, sizeof path, dense_dir, "config.json", err));
        KST_TRY(load_dense_config(cfg, path, err));
    }
    e->normalize = st_module_path(mods, "Normalize") != NULL;
    /* sentence_bert_config.json: the max length sentence-transformers truncates at */
    KST_TRY(kst_path_join(path, sizeof path, model_dir, "sentence_bert_config.json", err));
    if (kst_path_exists(path)) {
        cJSON *sb = NULL;
        KST_TRY(kst_json_load(path, &sb, err));
        long msl = 0;
        rc = kst_json_int(sb, "max_seq_length", &msl, path, err);
        cJSON_Delete(sb);
        if (rc != KST_OK) goto done;
        if (msl > 0) e->max_len = (size_t)msl;
    }
    /* config_sentence_transformers.json: similarity function and prompts */
    KST_TRY(kst_path_join(path, sizeof path, e->dir, "config_sentence_transformers.json", err));
    if (kst_path_exists(path)) {
        cJSON *cs = NULL;
        KST_TRY(kst_json_load(path, &cs, err));
        const char *sim = NULL, *qp = NULL;
        rc = kst_json_str(cs, "similarity_fn_name", &sim, path, err);
        const cJSON *prompts = cJSON_GetObjectItemCaseSensitive(cs, "prompts");
        if (rc == KST_OK && cJSON_IsObject(prompts)) rc = kst_json_str(prompts, "query", &qp, path, err);
        if (rc == KST_OK && sim) {
            if (strcmp(sim, "dot") == 0 || strcmp(sim, "dot_product") == 0) e->similarity = KST_SIM_DOT;
            else if (strcmp(sim, "cosine") != 0)
                rc = kst_fail(err, KST_ERR_UNSUPPORTED, "%s: similarity_fn_name \"%s\" (expected cosine or dot)", path, sim);
        }
        if (rc == KST_OK && qp && *qp) {
            e->query_prompt = kst_strndup(qp, (size_t)-1, err);
            if (!e->query_prompt) rc = KST_ERR_NOMEM;
        }
        cJSON_Delete(cs);
        if (rc != KST_OK) goto done;
    }
done:
    cJSON_Delete(mods);
    return rc;
}

static int setup_colbert(kst_encoder *e, kst_bert_config *cfg, kst_error *err) {
    char path[PATH_CAP];
    cJSON *j = NULL;
    int rc = KST_OK;
    KST_TRY(kst_path_join(path, sizeof path, e->dir, "artifact.metadata", err));
    long qml = 32, dml = 180, dim = 128;
    int maskp = 1, attend = 0;
    const char *qtok = "[unused0]", *dtok = "[unused1]";
    if (kst_path_exists(path)) {
        KST_TRY(kst_json_load(path, &j, err));
        KST_TRY(kst_json_int(j, "query_maxlen", &qml, path, err));
        KST_TRY(kst_json_int(j, "doc_maxlen", &dml, path, err));
        KST_TRY(kst_json_int(j, "dim", &dim, path, err));
        KST_TRY(kst_json_bool(j, "mask_punctuation", &maskp, path, err));
        KST_TRY(kst_json_bool(j, "attend_to_mask_tokens", &attend, path, err));
        KST_TRY(kst_json_str(j, "query_token_id", &qtok, path, err));
        KST_TRY(kst_json_str(j, "doc_token_id", &dtok, path, err));
    }
    if (qml < 4 || dml < 4 || dim <= 0) {
        rc = kst_fail(err, KST_ERR_FORMAT, "%s: query_maxlen and doc_maxlen must be >= 4 and dim > 0", path);
        goto done;
    }
    e->query_maxlen = (size_t)qml;
    e->doc_maxlen = (size_t)dml;
    e->attend_to_mask = attend;
    cfg->proj_dim = (size_t)dim;
    e->q_marker = kst_token_id(e->tok, qtok);
    e->d_marker = kst_token_id(e->tok, dtok);
    if (e->q_marker < 0 || e->d_marker < 0) {
        rc = kst_fail(err, KST_ERR_FORMAT, "%s: marker tokens %s / %s are not in the vocabulary", path, qtok, dtok);
        goto done;
    }
    size_t V = kst_tokenizer_vocab_size(e->tok);
    e->skip = kst_calloc(V ? V : 1, 1, "punctuation skiplist", err);
    if (!e->skip) {
        rc = KST_ERR_NOMEM;
        goto done;
    }
    if (maskp) {
        /* ColBERT drops document tokens whose id is that of an ASCII punctuation symbol
         * (Python's string.punctuation) tokenized on its own. */
        const char *punct = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~";
        for (const char *c = punct; *c; c++) {
            kst_ids ids = {0};
            rc = kst_tokenize(e->tok, c, 1, &ids, err);
            if (rc == KST_OK && ids.len > 0 && (size_t)ids.ids[0] < V) e->skip[ids.ids[0]] = 1;
            kst_ids_free(&ids);
            if (rc != KST_OK) goto done;
        }
    }
done:
    cJSON_Delete(j);
    return rc;
}

int kst_encoder_open(const char *dir, kst_role role, kst_encoder **out, kst_error *err) {
    *out = NULL;
    int rc = KST_OK;
    kst_safetensors st = {0}, dst = {0};
    char model_dir[PATH_CAP], dense_dir[PATH_CAP] = "", path[PATH_CAP];
    int brc = kst_blas_init(err);
    if (brc != KST_OK) return brc;
    kst_encoder *e = kst_calloc(1, sizeof *e, "encoder", err);
    if (!e) return KST_ERR_NOMEM;
    e->dir = kst_strndup(dir, (size_t)-1, err);
    if (!e->dir) {
        rc = KST_ERR_NOMEM;
        goto done;
    }
    KST_TRY(kst_path_join(path, sizeof path, dir, "config.json", err));
    if (!kst_path_exists(dir)) {
        rc = kst_fail(err, KST_ERR_NOTFOUND, "%s: no such model folder", dir);
        goto done;
    }
    e->role = role == KST_ROLE_AUTO ? detect_role(dir) : role;
    snprintf(model_dir, sizeof model_dir, "%s", dir);
    kst_bert_config cfg;
    memset(&cfg, 0, sizeof cfg);
    e->pool_modes = KST_POOL_CLS;
    e->similarity = KST_SIM_COSINE;
    char stpath[PATH_CAP];
    KST_TRY(kst_path_join(stpath, sizeof stpath, dir, "modules.json", err));
    if (e->role == KST_ROLE_DENSE && kst_path_exists(stpath))
        KST_TRY(setup_dense_st(e, &cfg, model_dir, sizeof model_dir, dense_dir, err));
    /* The transformer's own config and tokenizer. */
    kst_bert_config tcfg;
    KST_TRY(kst_path_join(path, sizeof path, model_dir, "config.json", err));
    KST_TRY(kst_bert_config_load(path, &tcfg, err));
    tcfg.dense_in = cfg.dense_in;
    tcfg.dense_out = cfg.dense_out;
    tcfg.dense_act = cfg.dense_act;
    KST_TRY(kst_tokenizer_load(model_dir, &e->tok, err));
    if (kst_tokenizer_vocab_size(e->tok) > tcfg.V) {
        rc = kst_fail(err, KST_ERR_SHAPE, "%s: the vocabulary has %zu tokens but vocab_size is %zu",
                      model_dir, kst_tokenizer_vocab_size(e->tok), tcfg.V);
        goto done;
    }
    size_t tml = kst_tokenizer_model_max_length(e->tok);
    if (e->role == KST_ROLE_COLBERT) {
        KST_TRY(setup_colbert(e, &tcfg, err));
        tcfg.NL = 0;
        e->dim = tcfg.proj_dim;
    } else if (e->role == KST_ROLE_CROSS) {
        tcfg.pool_dim = tcfg.C;
        e->max_len = tml && tml < tcfg.P ? tml : tcfg.P;
    } else {
        tcfg.NL = 0;
        if (!e->max_len) e->max_len = tml && tml < tcfg.P ? tml : tcfg.P;
        if (e->max_len > tcfg.P) e->max_len = tcfg.P;
        int modes = 0;
        for (unsigned m = e->pool_modes; m; m >>= 1) modes += (int)(m & 1);
        size_t pooled = (size_t)modes * tcfg.C;
        if (tcfg.dense_out && tcfg.dense_in != pooled) {
            rc = kst_fail(err, KST_ERR_SHAPE, "%s: Dense in_features %zu does not match the pooled size %zu",
                          dense_dir, tcfg.dense_in, pooled);
            goto done;
        }
        e->dim = tcfg.dense_out ? tcfg.dense_out : pooled;
    }
    KST_TRY(kst_bert_alloc(&e->bert, &tcfg, err));
    KST_TRY(kst_path_join(path, sizeof path, model_dir, "model.safetensors", err));
    if (!kst_path_exists(path)) {
        char bin[PATH_CAP];
        KST_TRY(kst_path_join(bin, sizeof bin, model_dir, "pytorch_model.bin", err));
        if (kst_path_exists(bin))
            rc = kst_fail(err, KST_ERR_UNSUPPORTED,
                          "%s: only safetensors weights are read; convert pytorch_model.bin with "
                          "transformers (model.save_pretrained(dir, safe_serialization=True))", model_dir);
        else
            rc = kst_fail(err, KST_ERR_NOTFOUND, "%s: no model.safetensors", model_dir);
        goto done;
    }
    KST_TRY(kst_safetensors_open(path, &st, err));
    KST_TRY(kst_bert_load_weights(&e->bert, &st, err));
    if (!(e->weight_files[e->n_weight_files++] = kst_strndup(path, (size_t)-1, err))) {
        rc = KST_ERR_NOMEM;
        goto done;
    }
    if (tcfg.dense_out) {
        KST_TRY(kst_path_join(path, sizeof path, dense_dir, "model.safetensors", err));
        if (!kst_path_exists(path)) {
            rc = kst_fail(err, KST_ERR_NOTFOUND, "%s: the Dense module has no model.safetensors", dense_dir);
            goto done;
        }
        KST_TRY(kst_safetensors_open(path, &dst, err));
        KST_TRY(kst_bert_load_dense(&e->bert, &dst, err));
        if (!(e->weight_files[e->n_weight_files++] = kst_strndup(path, (size_t)-1, err))) {
            rc = KST_ERR_NOMEM;
            goto done;
        }
    }
done:
    kst_safetensors_close(&st);
    kst_safetensors_close(&dst);
    if (rc != KST_OK) {
        kst_encoder_free(e);
        return rc;
    }
    *out = e;
    return KST_OK;
}

void kst_encoder_free(kst_encoder *e) {
    if (!e) return;
    kst_tokenizer_free(e->tok);
    kst_bert_gpu_free(e->gpu);
    kst_bert_free(&e->bert);
    kst_free(e->query_prompt);
    kst_free(e->skip);
    for (size_t i = 0; i < e->n_weight_files; i++) kst_free(e->weight_files[i]);
    kst_free(e->dir);
    kst_free(e);
}

size_t kst_encoder_num_scores(const kst_encoder *e) {
    return e->role == KST_ROLE_CROSS ? e->bert.cfg.NL : 1;
}

/* ------------------------------------------------------------------------------------------ */
/* tokenization per role */

int kst_encoder_tokenize(kst_encoder *e, const char *a, size_t alen, const char *b, size_t blen,
                         int is_query, size_t max_len, kst_ids *out, kst_error *err) {
    out->len = 0;
    int rc = KST_OK;
    /* transformers treats an empty second text as no second text: [CLS] a [SEP]. */
    if (b && blen == 0) b = NULL;
    if (e->role == KST_ROLE_COLBERT && !b) {
        /* ColBERTv2 tokenizes ". " + text and overwrites the "." with the marker: the same as
         * [CLS] marker tokens [SEP], truncated to the max length. Queries are then padded with
         * [MASK] up to query_maxlen. */
        size_t ml = max_len ? max_len : (is_query ? e->query_maxlen : e->doc_maxlen);
        kst_special_ids sp = kst_tokenizer_special(e->tok);
        KST_TRY(kst_tokenizer_encode(e->tok, a, alen, NULL, 0, ml > 1 ? ml - 1 : 1, out, err));
        /* out = [CLS] tokens [SEP]; insert the marker after [CLS]. */
        KST_TRY(kst_realloc((void **)&out->ids, out->len + 1 > ml ? out->len + 1 : ml, sizeof(int32_t), "token ids", err));
        KST_TRY(kst_realloc((void **)&out->type_ids, out->len + 1 > ml ? out->len + 1 : ml, sizeof(int32_t), "token ids", err));
        out->cap = out->len + 1 > ml ? out->len + 1 : ml;
        memmove(out->ids + 2, out->ids + 1, (out->len - 1) * sizeof(int32_t));
        out->ids[1] = is_query ? e->q_marker : e->d_marker;
        out->len++;
        memset(out->type_ids, 0, out->cap * sizeof(int32_t));
        if (is_query)
            while (out->len < ml) out->ids[out->len++] = sp.mask;
        return KST_OK;
    }
    if (!b && is_query && e->query_prompt) {
        /* sentence-transformers prepends the prompt text to the query before tokenizing. */
        size_t pl = strlen(e->query_prompt);
        char *joined = kst_malloc(pl + alen + 1, 1, "prompted query", err);
        if (!joined) return KST_ERR_NOMEM;
        memcpy(joined, e->query_prompt, pl);
        memcpy(joined + pl, a, alen);
        rc = kst_tokenizer_encode(e->tok, joined, pl + alen, NULL, 0, max_len ? max_len : e->max_len, out, err);
        kst_free(joined);
        return rc;
    }
    return kst_tokenizer_encode(e->tok, a, alen, b, blen, max_len ? max_len : e->max_len, out, err);
done:
    return rc;
}

/* ------------------------------------------------------------------------------------------ */
/* batching */

typedef struct batch_item {
    size_t index; /* position in the caller's arrays */
    kst_ids ids;
} batch_item;

static int cmp_len(const void *a, const void *b) {
    const batch_item *x = a, *y = b;
    if (x->ids.len != y->ids.len) return x->ids.len < y->ids.len ? -1 : 1;
    return x->index < y->index ? -1 : x->index > y->index;
}

/* Called per sequence after the forward pass with its hidden states (T rows, `len` real). */
typedef int (*head_fn)(kst_encoder *e, void *ctx, size_t index, const int32_t *ids,
                       const float *hidden, size_t len, kst_error *err);

/* Tokenizes inputs [lo, hi) into items[lo..hi). */
typedef struct tok_job {
    kst_encoder *e;
    const char *const *a, *const *b;
    const size_t *alen, *blen;
    size_t lo, hi, max_len;
    int is_query;
    batch_item *items;
    int rc;
    kst_error err;
    int threads; /* tokenize_par: threads to split the range over (0 or 1: this one) */
} tok_job;

static void *tokenize_range(void *p) {
    tok_job *j = p;
    j->rc = KST_OK;
    for (size_t i = j->lo; i < j->hi && j->rc == KST_OK; i++) {
        j->items[i].index = i;
        j->rc = kst_encoder_tokenize(j->e, j->a[i], j->alen ? j->alen[i] : strlen(j->a[i]),
                                     j->b ? j->b[i] : NULL,
                                     j->b ? (j->blen ? j->blen[i] : strlen(j->b[i])) : 0, j->is_query,
                                     j->max_len, &j->items[i].ids, &j->err);
    }
    return NULL;
}

/* tokenize_range over j->threads threads, each a contiguous part of the range (the tokenizer
 * only reads the encoder); the first part that fails gives j's error, as one thread would. */
#define TOK_THREADS_MAX 16
static void *tokenize_par(void *p) {
    tok_job *j = p;
    size_t n = j->hi - j->lo;
    int nt = j->threads < 1 ? 1 : j->threads > TOK_THREADS_MAX ? TOK_THREADS_MAX : j->threads;
    if ((size_t)nt > n / 64) nt = n / 64 > 0 ? (int)(n / 64) : 1; /* at least 64 texts a thread */
    tok_job sub[TOK_THREADS_MAX];
    pthread_t th[TOK_THREADS_MAX];
    int started[TOK_THREADS_MAX] = {0};
    for (int k = 0; k < nt; k++) {
        sub[k] = *j;
        sub[k].lo = j->lo + n * (size_t)k / (size_t)nt;
        sub[k].hi = j->lo + n * (size_t)(k + 1) / (size_t)nt;
        if (k > 0) started[k] = pthread_create(&th[k], NULL, tokenize_range, &sub[k]) == 0;
    }
    tokenize_range(&sub[0]);
    for (int k = 1; k < nt; k++) {
        if (started[k]) pthread_join(th[k], NULL);
        else tokenize_range(&sub[k]);
    }
    j->rc = KST_OK;
    for (int k = 0; k < nt; k++)
        if (sub[k].rc != KST_OK) {
            j->rc = sub[k].rc;
            j->err = sub[k].err;
            break;
        }
    return NULL;
}

/* Threads for tokenizing ahead of the GPU: the cores but one (the one feeding the GPU), at most 8. */
static int gpu_tokenize_threads(void) {
    long c = sysconf(_SC_NPROCESSORS_ONLN);
    return c <= 2 ? 1 : c - 1 > 8 ? 8 : (int)(c - 1);
}

/* Fills ids, types (B, T) and valid (B) for items[0..B) padded to T. */
static void fill_batch(kst_encoder *e, const batch_item *items, size_t B, size_t T, int is_query, int pairs,
                       int32_t *ids, int32_t *types, int *valid) {
    kst_special_ids sp = kst_tokenizer_special(e->tok);
    for (size_t r = 0; r < B; r++) {
        const kst_ids *v = &items[r].ids;
        valid[r] = (int)v->len;
        /* ColBERT queries keep their [MASK] padding out of attention unless configured. */
        if (e->role == KST_ROLE_COLBERT && is_query && !e->attend_to_mask && !pairs) {
            size_t k = v->len;
            while (k > 0 && v->ids[k - 1] == sp.mask) k--;
            valid[r] = (int)k;
        }
        for (size_t t = 0; t < T; t++) {
            ids[r * T + t] = t < v->len ? v->ids[t] : (sp.pad >= 0 ? sp.pad : 0);
            types[r * T + t] = t < v->len ? v->type_ids[t] : 0;
        }
    }
}

/* The GPU's pipeline over the sorted batches: while the GPU runs batch s, the CPU pads batch
 * s + 1 and runs the heads over batch s - 1's hidden states (two pinned buffers lent by the GPU
 * encoder, filled by kst_bert_gpu_forward_async on a copy stream that overlaps the next batch's
 * kernels). KESTREL_GPU_PIPELINE=0 runs one batch at a time (to compare). */
static int encode_items_gpu(kst_encoder *e, batch_item *items, size_t n, int is_query, int pairs,
                            size_t batch, head_fn head, void *ctx, kst_error *err) {
    int rc = KST_OK;
    size_t C = e->bert.cfg.C, maxT = items[n - 1].ids.len, nb = (n + batch - 1) / batch;
    int32_t *ids[2] = {NULL, NULL}, *types = NULL;
    int *valid = NULL;
    float *hidden[2] = {NULL, NULL};
    types = kst_malloc(batch * maxT + 1, sizeof *types, "batch ids", err);
    valid = kst_malloc(batch, sizeof *valid, "batch lengths", err);
    for (int i = 0; i < 2; i++) {
        ids[i] = kst_malloc(batch * maxT + 1, sizeof *ids[i], "batch ids", err);
        hidden[i] = kst_bert_gpu_host_take(e->gpu, (batch * maxT * C + 1) * sizeof(float), err);
    }
    if (!types || !valid || !ids[0] || !ids[1] || !hidden[0] || !hidden[1]) {
        rc = KST_ERR_NOMEM;
        goto done;
    }
    for (size_t s = 0; s <= nb; s++) {
        /* queue batch s (returns once batch s - 1 is done) ... */
        if (s < nb) {
            size_t lo = s * batch, B = n - lo < batch ? n - lo : batch, T = items[lo + B - 1].ids.len;
            fill_batch(e, items + lo, B, T, is_query, pairs, ids[s & 1], types, valid);
            KST_TRY(kst_bert_gpu_forward_async(e->gpu, hidden[s & 1], ids[s & 1], types, valid, B, T, err));
        } else {
            KST_TRY(kst_bert_gpu_sync(e->gpu, err));
        }
        /* ... then the heads of batch s - 1 while the GPU runs batch s */
        if (s > 0) {
            size_t p = s - 1, lo = p * batch, B = n - lo < batch ? n - lo : batch, T = items[lo + B - 1].ids.len;
            for (size_t r = 0; r < B; r++)
                KST_TRY(head(e, ctx, items[lo + r].index, ids[p & 1] + r * T, hidden[p & 1] + r * T * C,
                             items[lo + r].ids.len, err));
        }
    }
done:
    if (rc != KST_OK) {
        kst_error ignore;
        kst_bert_gpu_sync(e->gpu, &ignore); /* nothing may still write into hidden */
    }
    for (int i = 0; i < 2; i++) {
        kst_free(ids[i]);
        kst_bert_gpu_host_give(e->gpu, hidden[i]);
    }
    kst_free(types);
    kst_free(valid);
    return rc;
}

static int gpu_pipeline_enabled(void) {
    const char *v = getenv("KESTREL_GPU_PIPELINE");
    return !(v && strcmp(v, "0") == 0);
}

/* Sorts items (n) by length and runs the transformer over batches of similar length, handing
 * each sequence to `head`. */
static int encode_items(kst_encoder *e, batch_item *items, size_t n, int is_query, int pairs,
                        size_t batch, head_fn head, void *ctx, kst_error *err) {
    int rc = KST_OK;
    size_t C = e->bert.cfg.C;
    int32_t *ids = NULL, *types = NULL;
    int *valid = NULL;
    float *hidden = NULL;
    kst_bert_acts acts = {0}; /* per call, so concurrent calls never share scratch */
    qsort(items, n, sizeof *items, cmp_len);
    /* more than one batch on the GPU: pipelined (a single batch has nothing to overlap) */
    if (e->gpu && n > batch && gpu_pipeline_enabled())
        return encode_items_gpu(e, items, n, is_query, pairs, batch, head, ctx, err);
    size_t maxT = n ? items[n - 1].ids.len : 0;
    ids = kst_malloc(batch * maxT + 1, sizeof *ids, "batch ids", err);
    types = kst_malloc(batch * maxT + 1, sizeof *types, "batch ids", err);
    valid = kst_malloc(batch, sizeof *valid, "batch lengths", err);
    hidden = kst_malloc(batch * maxT * C + 1, sizeof *hidden, "hidden states", err);
    if (!ids || !types || !valid || !hidden) {
        rc = KST_ERR_NOMEM;
        goto done;
    }
    for (size_t s = 0; s < n; s += batch) {
        size_t B = n - s < batch ? n - s : batch;
        size_t T = items[s + B - 1].ids.len;
        fill_batch(e, items + s, B, T, is_query, pairs, ids, types, valid);
        if (e->gpu) KST_TRY(kst_bert_gpu_forward(e->gpu, hidden, ids, types, valid, B, T, err));
        else KST_TRY(kst_bert_forward(&e->bert, &acts, hidden, ids, types, valid, B, T, err));
        for (size_t r = 0; r < B; r++)
            KST_TRY(head(e, ctx, items[s + r].index, ids + r * T, hidden + r * T * C,
                         items[s + r].ids.len, err));
    }
done:
    kst_free(ids);
    kst_free(types);
    kst_free(valid);
    kst_free(hidden);
    kst_bert_acts_free(&acts);
    return rc;
}

/* Texts per tokenization chunk on the GPU: the next chunk is tokenized on CPU threads while
 * the GPU encodes this one. */
#define GPU_TOKENIZE_CHUNK 4096

/* Tokenizes every input, sorts by length, and runs the transformer over batches of similar
 * length, handing each sequence to `head`. Pair inputs when b != NULL. On the GPU, long inputs
 * go in chunks whose tokenization overlaps the previous chunk's encoding. */
static int run_batches(kst_encoder *e, const char *const *a, const size_t *alen,
                       const char *const *b, const size_t *blen, size_t n, int is_query,
                       size_t max_len, size_t batch, head_fn head, void *ctx, kst_error *err) {
    int rc = KST_OK;
    if (batch == 0) batch = 32;
    batch_item *items = kst_calloc(n ? n : 1, sizeof *items, "batch items", err);
    if (!items) return KST_ERR_NOMEM;
    size_t chunk = e->gpu ? GPU_TOKENIZE_CHUNK : (n ? n : 1);
    tok_job cur = {e, a, b, alen, blen, 0, n < chunk ? n : chunk, max_len, is_query, items, 0, {0, ""}, 1};
    int nthreads = e->gpu ? gpu_tokenize_threads() : 1;
    cur.threads = nthreads;
    tokenize_par(&cur);
    if (cur.rc != KST_OK) {
        rc = cur.rc;
        if (err) *err = cur.err;
        goto done;
    }
    for (size_t lo = 0; lo < n; lo += chunk) {
        size_t hi = lo + chunk < n ? lo + chunk : n;
        tok_job next = {e, a, b, alen, blen, hi, hi + chunk < n ? hi + chunk : n, max_len, is_query, items, 0, {0, ""}, 1};
        next.threads = nthreads;
        pthread_t th;
        int threaded = hi < n && pthread_create(&th, NULL, tokenize_par, &next) == 0;
        rc = encode_items(e, items + lo, hi - lo, is_query, b != NULL, batch, head, ctx, err);
        if (threaded) pthread_join(th, NULL);
        else if (hi < n && rc == KST_OK) tokenize_par(&next);
        if (rc == KST_OK && next.rc != KST_OK) {
            rc = next.rc;
            if (err) *err = next.err;
        }
        if (rc != KST_OK) goto done;
    }
done:
    for (size_t i = 0; i < n; i++) kst_ids_free(&items[i].ids);
    kst_free(items);
    return rc;
}

/* ------------------------------------------------------------------------------------------ */
/* dense head */

typedef struct dense_ctx {
    float *out; /* (n, dim) */
    float *pooled, *tmp;
} dense_ctx;

static int dense_head(kst_encoder *e, void *vctx, size_t index, const int32_t *ids,
                      const float *hidden, size_t len, kst_error *err) {
    dense_ctx *ctx = vctx;
    const kst_bert *m = &e->bert;
    size_t C = m->cfg.C;
    float *pooled = ctx->pooled;
    size_t off = 0;
    if (e->pool_modes & KST_POOL_CLS) {
        memcpy(pooled, hidden, C * sizeof(float));
        off += C;
    }
    if (e->pool_modes & KST_POOL_MAX) {
        for (size_t k = 0; k < C; k++) {
            float mx = hidden[k];
            for (size_t t = 1; t < len; t++) mx = hidden[t * C + k] > mx ? hidden[t * C + k] : mx;
            pooled[off + k] = mx;
        }
        off += C;
    }
    if (e->pool_modes & (KST_POOL_MEAN | KST_POOL_MEAN_SQRT)) {
        for (size_t k = 0; k < C; k++) {
            float s = 0; /* float32 sum over tokens, as torch.sum does */
            for (size_t t = 0; t < len; t++) s += hidden[t * C + k];
            if (e->pool_modes & KST_POOL_MEAN) pooled[off + k] = s / (float)len;
            if (e->pool_modes & KST_POOL_MEAN_SQRT)
                pooled[off + k + ((e->pool_modes & KST_POOL_MEAN) ? C : 0)] = s / sqrtf((float)len);
        }
        off += ((e->pool_modes & KST_POOL_MEAN) ? C : 0) + ((e->pool_modes & KST_POOL_MEAN_SQRT) ? C : 0);
    }
    float *dst = ctx->out + index * e->dim;
    if (m->cfg.dense_out) {
        kst_matmul_forward(dst, pooled, m->params.densew, m->params.denseb, 1, m->cfg.dense_in, m->cfg.dense_out);
        kst_act_forward(dst, dst, m->cfg.dense_out, m->cfg.dense_act);
    } else {
        memcpy(dst, pooled, off * sizeof(float));
    }
    if (e->normalize) kst_l2norm_forward(dst, NULL, dst, 1, e->dim);
    return KST_OK;
}

int kst_encoder_embed(kst_encoder *e, const char *const *texts, const size_t *lens, size_t n,
                      int is_query, size_t max_len, size_t batch, float *out, kst_error *err) {
    if (e->role != KST_ROLE_DENSE)
        return kst_fail(err, KST_ERR_MISUSE, "%s: a %s model gives token vectors or scores, not one vector per text",
                        e->dir, kst_role_name(e->role));
    dense_ctx ctx = {out, NULL, NULL};
    ctx.pooled = kst_malloc(4 * e->bert.cfg.C + e->dim, sizeof(float), "pooled vector", err);
    if (!ctx.pooled) return KST_ERR_NOMEM;
    int rc = run_batches(e, texts, lens, NULL, NULL, n, is_query, max_len, batch, dense_head, &ctx, err);
    kst_free(ctx.pooled);
    return rc;
}

/* ------------------------------------------------------------------------------------------ */
/* ColBERT head */

typedef struct colbert_ctx {
    int is_query;
    float **rows;    /* (n) per-text vectors */
    size_t *counts;  /* (n) */
} colbert_ctx;

static int colbert_head(kst_encoder *e, void *vctx, size_t index, const int32_t *ids,
                        const float *hidden, size_t len, kst_error *err) {
    colbert_ctx *ctx = vctx;
    size_t C = e->bert.cfg.C, D = e->dim;
    kst_special_ids sp = kst_tokenizer_special(e->tok);
    float *v = kst_malloc(len ? len : 1, D * sizeof(float), "token vectors", err);
    if (!v) return KST_ERR_NOMEM;
    /* One product over the sequence's rows, then the kept rows moved up in place (row t goes to
     * kept <= t) and normalised. */
    kst_matmul_forward(v, hidden, e->bert.params.projw, NULL, len, C, D);
    size_t kept = 0;
    for (size_t t = 0; t < len; t++) {
        int32_t id = ids[t];
        if (!ctx->is_query && (id == sp.pad || e->skip[id])) continue;
        if (kept != t) memcpy(v + kept * D, v + t * D, D * sizeof(float));
        kst_l2norm_forward(v + kept * D, NULL, v + kept * D, 1, D);
        kept++;
    }
    ctx->rows[index] = v;
    ctx->counts[index] = kept;
    return KST_OK;
}

/* Runs the ColBERT encoder; rows[i] (counts[i], dim) are allocated per text. */
static int colbert_encode(kst_encoder *e, const char *const *texts, const size_t *lens, size_t n,
                          int is_query, size_t max_len, size_t batch, float **rows, size_t *counts,
                          kst_error *err) {
    if (e->role != KST_ROLE_COLBERT)
        return kst_fail(err, KST_ERR_MISUSE, "%s: token vectors need a ColBERT model (this one is %s)",
                        e->dir, kst_role_name(e->role));
    colbert_ctx ctx = {is_query, rows, counts};
    return run_batches(e, texts, lens, NULL, NULL, n, is_query, max_len, batch, colbert_head, &ctx, err);
}

int kst_encoder_embed_tokens(kst_encoder *e, const char *const *texts, const size_t *lens,
                             size_t n, int is_query, size_t max_len, size_t batch, float **vecs,
                             size_t *total, int64_t *offsets, kst_error *err) {
    *vecs = NULL;
    *total = 0;
    int rc = KST_OK;
    float **rows = kst_calloc(n ? n : 1, sizeof *rows, "token rows", err);
    size_t *counts = kst_calloc(n ? n : 1, sizeof *counts, "token counts", err);
    if (!rows || !counts) {
        rc = KST_ERR_NOMEM;
        goto done;
    }
    KST_TRY(colbert_encode(e, texts, lens, n, is_query, max_len, batch, rows, counts, err));
    size_t sum = 0;
    for (size_t i = 0; i < n; i++) sum += counts[i];
    *vecs = kst_malloc(sum ? sum : 1, e->dim * sizeof(float), "token vectors", err);
    if (!*vecs) {
        rc = KST_ERR_NOMEM;
        goto done;
    }
    size_t at = 0;
    for (size_t i = 0; i < n; i++) {
        offsets[i] = (int64_t)at;
        memcpy(*vecs + at * e->dim, rows[i], counts[i] * e->dim * sizeof(float));
        at += counts[i];
    }
    offsets[n] = (int64_t)at;
    *total = sum;
done:
    if (rows)
        for (size_t i = 0; i < n; i++) kst_free(rows[i]);
    kst_free(rows);
    kst_free(counts);
    return rc;
}

/* ------------------------------------------------------------------------------------------ */
/* scoring */

typedef struct cross_ctx {
    float *out; /* (n, NL) */
    float *pooled;
} cross_ctx;

static int cross_head(kst_encoder *e, void *vctx, size_t index, const int32_t *ids,
                      const float *hidden, size_t len, kst_error *err) {
    cross_ctx *ctx = vctx;
    const kst_bert *m = &e->bert;
    size_t C = m->cfg.C, PD = m->cfg.pool_dim, NL = m->cfg.NL;
    /* BERT: tanh(pooler(h_cls)); DistilBERT: relu(pre_classifier(h_cls)). Then the classifier. */
    kst_matmul_forward(ctx->pooled, hidden, m->params.poolw, m->params.poolb, 1, C, PD);
    kst_act_forward(ctx->pooled, ctx->pooled, PD, m->cfg.arch == KST_ARCH_BERT ? KST_ACT_TANH : KST_ACT_RELU);
    kst_matmul_forward(ctx->out + index * NL, ctx->pooled, m->params.clsw, m->params.clsb, 1, PD, NL);
    return KST_OK;
}

int kst_encoder_score(kst_encoder *e, const char *const *queries, const size_t *qlens,
                      const char *const *passages, const size_t *plens, size_t n, size_t max_len,
                      size_t batch, float *out, kst_error *err) {
    int rc = KST_OK;
    if (e->role == KST_ROLE_CROSS) {
        cross_ctx ctx = {out, NULL};
        ctx.pooled = kst_malloc(e->bert.cfg.pool_dim, sizeof(float), "pooled vector", err);
        if (!ctx.pooled) return KST_ERR_NOMEM;
        rc = run_batches(e, queries, qlens, passages, plens, n, 0, max_len, batch, cross_head, &ctx, err);
        kst_free(ctx.pooled);
        return rc;
    }
    if (e->role == KST_ROLE_DENSE) {
        float *q = kst_malloc(n ? n : 1, e->dim * sizeof(float), "query vectors", err);
        float *p = kst_malloc(n ? n : 1, e->dim * sizeof(float), "passage vectors", err);
        if (!q || !p) {
            rc = KST_ERR_NOMEM;
            goto dense_done;
        }
        rc = kst_encoder_embed(e, queries, qlens, n, 1, max_len, batch, q, err);
        if (rc == KST_OK) rc = kst_encoder_embed(e, passages, plens, n, 0, max_len, batch, p, err);
        for (size_t i = 0; rc == KST_OK && i < n; i++) {
            const float *a = q + i * e->dim, *b = p + i * e->dim;
            double ab = 0, aa = 0, bb = 0;
            for (size_t k = 0; k < e->dim; k++) {
                ab += (double)a[k] * b[k];
                aa += (double)a[k] * a[k];
                bb += (double)b[k] * b[k];
            }
            /* cosine as torch's cos_sim: each side normalised with eps 1e-12 */
            out[i] = e->similarity == KST_SIM_DOT
                         ? (float)ab
                         : (float)(ab / ((sqrt(aa) > 1e-12 ? sqrt(aa) : 1e-12) * (sqrt(bb) > 1e-12 ? sqrt(bb) : 1e-12)));
        }
    dense_done:
        kst_free(q);
        kst_free(p);
        return rc;
    }
    /* ColBERT: MaxSim of the query's vectors against the passage's kept tokens. */
    float **qr = kst_calloc(n ? n : 1, sizeof *qr, "query rows", err);
    float **dr = kst_calloc(n ? n : 1, sizeof *dr, "doc rows", err);
    size_t *qc = kst_calloc(n ? n : 1, sizeof *qc, "query counts", err);
    size_t *dc = kst_calloc(n ? n : 1, sizeof *dc, "doc counts", err);
    if (!qr || !dr || !qc || !dc) {
        rc = KST_ERR_NOMEM;
        goto colbert_done;
    }
    KST_TRY(colbert_encode(e, queries, qlens, n, 1, 0, batch, qr, qc, err));
    KST_TRY(colbert_encode(e, passages, plens, n, 0, max_len, batch, dr, dc, err));
    for (size_t i = 0; i < n; i++) out[i] = kst_maxsim_forward(NULL, qr[i], dr[i], NULL, qc[i], dc[i], e->dim);
done:
colbert_done:
    for (size_t i = 0; i < n; i++) {
        if (qr) kst_free(qr[i]);
        if (dr) kst_free(dr[i]);
    }
    kst_free(qr);
    kst_free(dr);
    kst_free(qc);
    kst_free(dc);
    return rc;
}

int kst_encoder_set_device(kst_encoder *e, int device, kst_error *err) {
    kst_bert_gpu_free(e->gpu);
    e->gpu = NULL;
    if (device == 0) return KST_OK;
    int rc = kst_bert_gpu_create(&e->bert, &e->gpu, err);
    if (rc != KST_OK) kst_error_prefix(err, "%s", e->dir);
    return rc;
}
