/* bert.c - BERT / DistilBERT: config.json, weights from safetensors, and the forward pass. */
#include "bert.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "core/check.h"
#include "core/json.h"
#include "core/mem.h"

/* ------------------------------------------------------------------------------------------ */
/* config.json */

int kst_act_from_name(const char *name) {
    if (!name) return -1;
    if (strcmp(name, "gelu") == 0) return KST_ACT_GELU;
    if (strcmp(name, "gelu_new") == 0 || strcmp(name, "gelu_pytorch_tanh") == 0 ||
        strcmp(name, "gelu_fast") == 0)
        return KST_ACT_GELU_TANH;
    if (strcmp(name, "relu") == 0) return KST_ACT_RELU;
    if (strcmp(name, "tanh") == 0) return KST_ACT_TANH;
    if (strcmp(name, "linear") == 0 || strcmp(name, "identity") == 0) return KST_ACT_IDENTITY;
    return -1;
}

/* Reads a required positive integer key. */
static int need_size(const cJSON *j, const char *key, size_t *out, const char *path,
                     kst_error *err) {
    long v = -1;
    int rc = kst_json_int(j, key, &v, path, err);
    if (rc != KST_OK) return rc;
    if (v < 0) return kst_fail(err, KST_ERR_FORMAT, "%s: missing \"%s\"", path, key);
    if (v == 0 || v > (1L << 24))
        return kst_fail(err, KST_ERR_FORMAT, "%s: \"%s\" = %ld is out of range", path, key, v);
    *out = (size_t)v;
    return KST_OK;
}

int kst_bert_config_load(const char *path, kst_bert_config *cfg, kst_error *err) {
    memset(cfg, 0, sizeof *cfg);
    cJSON *j = NULL;
    int rc = kst_json_load(path, &j, err);
    if (rc != KST_OK) return rc;
    const char *type = NULL, *act = NULL;
    KST_TRY(kst_json_str(j, "model_type", &type, path, err));
    if (!type) {
        rc = kst_fail(err, KST_ERR_FORMAT, "%s: missing \"model_type\" (expected bert or distilbert)",
                      path);
        goto done;
    }
    if (strcmp(type, "bert") == 0) {
        cfg->arch = KST_ARCH_BERT;
        KST_TRY(need_size(j, "vocab_size", &cfg->V, path, err));
        KST_TRY(need_size(j, "hidden_size", &cfg->C, path, err));
        KST_TRY(need_size(j, "num_hidden_layers", &cfg->L, path, err));
        KST_TRY(need_size(j, "num_attention_heads", &cfg->NH, path, err));
        KST_TRY(need_size(j, "intermediate_size", &cfg->FF, path, err));
        KST_TRY(need_size(j, "max_position_embeddings", &cfg->P, path, err));
        long tt = 2;
        KST_TRY(kst_json_int(j, "type_vocab_size", &tt, path, err));
        cfg->TT = tt > 0 ? (size_t)tt : 0;
        double eps = 1e-12;
        KST_TRY(kst_json_num(j, "layer_norm_eps", &eps, path, err));
        cfg->eps = (float)eps;
        act = "gelu";
        KST_TRY(kst_json_str(j, "hidden_act", &act, path, err));
        const char *pos = "absolute";
        KST_TRY(kst_json_str(j, "position_embedding_type", &pos, path, err));
        if (strcmp(pos, "absolute") != 0) {
            rc = kst_fail(err, KST_ERR_UNSUPPORTED,
                          "%s: position_embedding_type \"%s\" (only \"absolute\" is supported)",
                          path, pos);
            goto done;
        }
    } else if (strcmp(type, "distilbert") == 0) {
        cfg->arch = KST_ARCH_DISTILBERT;
        KST_TRY(need_size(j, "vocab_size", &cfg->V, path, err));
        KST_TRY(need_size(j, "dim", &cfg->C, path, err));
        KST_TRY(need_size(j, "n_layers", &cfg->L, path, err));
        KST_TRY(need_size(j, "n_heads", &cfg->NH, path, err));
        KST_TRY(need_size(j, "hidden_dim", &cfg->FF, path, err));
        KST_TRY(need_size(j, "max_position_embeddings", &cfg->P, path, err));
        cfg->TT = 0;
        cfg->eps = 1e-12f; /* DistilBERT's LayerNorms are built with this fixed eps */
        act = "gelu";
        KST_TRY(kst_json_str(j, "activation", &act, path, err));
    } else {
        rc = kst_fail(err, KST_ERR_UNSUPPORTED,
                      "%s: model_type \"%s\" is not supported (expected bert or distilbert)", path,
                      type);
        goto done;
    }
    int a = kst_act_from_name(act);
    if (a < 0 || a == KST_ACT_TANH || a == KST_ACT_IDENTITY) {
        rc = kst_fail(err, KST_ERR_UNSUPPORTED,
                      "%s: activation \"%s\" (expected gelu, gelu_new, gelu_pytorch_tanh or relu)",
                      path, act);
        goto done;
    }
    cfg->act = (kst_act)a;
    if (cfg->C % cfg->NH != 0) {
        rc = kst_fail(err, KST_ERR_FORMAT, "%s: hidden size %zu is not a multiple of %zu heads",
                      path, cfg->C, cfg->NH);
        goto done;
    }
    /* transformers saves id2label rather than num_labels, and omits it at its default of 2. */
    long nl = 2;
    KST_TRY(kst_json_int(j, "num_labels", &nl, path, err));
    const cJSON *id2label = cJSON_GetObjectItemCaseSensitive(j, "id2label");
    if (cJSON_IsObject(id2label)) nl = cJSON_GetArraySize(id2label);
    cfg->NL = nl > 0 ? (size_t)nl : 1;
done:
    cJSON_Delete(j);
    return rc;
}

/* ------------------------------------------------------------------------------------------ */
/* parameters */

static void param_sizes(const kst_bert_config *c, size_t *s) {
    size_t C = c->C, L = c->L;
    size_t cls_in = c->pool_dim ? c->pool_dim : C;
    size_t tab[KST_BERT_NPARAMS] = {
        c->V * C,     c->P * C,      c->TT * C,     C,      C,      L * 3 * C * C,
        L * 3 * C,    L * C * C,     L * C,         L * C,  L * C,  L * c->FF * C,
        L * c->FF,    L * C * c->FF, L * C,         L * C,  L * C,  c->pool_dim * C,
        c->pool_dim,  c->NL ? c->NL * cls_in : 0,   c->NL,  c->proj_dim * C,
        c->dense_out * c->dense_in, c->dense_out};
    memcpy(s, tab, sizeof tab);
}

int kst_bert_alloc(kst_bert *m, const kst_bert_config *cfg, kst_error *err) {
    memset(m, 0, sizeof *m);
    m->cfg = *cfg;
    param_sizes(cfg, m->param_sizes);
    size_t total = 0;
    for (int i = 0; i < KST_BERT_NPARAMS; i++) total += m->param_sizes[i];
    m->num_params = total;
    m->param_mem = kst_calloc(total ? total : 1, sizeof(float), "model parameters", err);
    if (!m->param_mem) return KST_ERR_NOMEM;
    float **ptrs[KST_BERT_NPARAMS] = {
        &m->params.wte,      &m->params.wpe,     &m->params.wtt,     &m->params.emblnw,
        &m->params.emblnb,   &m->params.qkvw,    &m->params.qkvb,    &m->params.attprojw,
        &m->params.attprojb, &m->params.ln1w,    &m->params.ln1b,    &m->params.fcw,
        &m->params.fcb,      &m->params.fcprojw, &m->params.fcprojb, &m->params.ln2w,
        &m->params.ln2b,     &m->params.poolw,   &m->params.poolb,   &m->params.clsw,
        &m->params.clsb,     &m->params.projw,   &m->params.densew,  &m->params.denseb};
    float *p = m->param_mem;
    for (int i = 0; i < KST_BERT_NPARAMS; i++) {
        *ptrs[i] = m->param_sizes[i] ? p : NULL;
        p += m->param_sizes[i];
    }
    return KST_OK;
}

void kst_bert_free(kst_bert *m) {
    if (!m) return;
    kst_free(m->param_mem);
    memset(m, 0, sizeof *m);
}

/* ------------------------------------------------------------------------------------------ */
/* loading weights */

typedef struct loader {
    const kst_safetensors *st;
    const char *prefix; /* "", "bert." or "distilbert." */
    unsigned char *used; /* (st->n) which tensors were consumed */
    kst_error *err;
} loader;

static const kst_st_tensor *find_marked(loader *ld, const char *name) {
    const kst_st_tensor *t = kst_safetensors_find(ld->st, name);
    if (t) ld->used[t - ld->st->tensors] = 1;
    return t;
}

/* Loads `name` (prefix added) of the given shape into dst. LayerNorm weights saved by old code as
 * gamma/beta are accepted, as transformers accepts them. */
static int load(loader *ld, float *dst, int ndim, size_t d0, size_t d1, const char *fmt, ...)
    KST_PRINTF(6, 7);
static int load(loader *ld, float *dst, int ndim, size_t d0, size_t d1, const char *fmt, ...) {
    char rel[256], name[300];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(rel, sizeof rel, fmt, ap);
    va_end(ap);
    snprintf(name, sizeof name, "%s%s", ld->prefix, rel);
    const kst_st_tensor *t = find_marked(ld, name);
    if (!t) {
        char alt[300];
        size_t n = strlen(name);
        const char *w = ".weight", *b = ".bias";
        if (strstr(name, "LayerNorm") || strstr(name, "layer_norm")) {
            if (n > 7 && strcmp(name + n - 7, w) == 0) {
                snprintf(alt, sizeof alt, "%.*s.gamma", (int)(n - 7), name);
                t = find_marked(ld, alt);
            } else if (n > 5 && strcmp(name + n - 5, b) == 0) {
                snprintf(alt, sizeof alt, "%.*s.beta", (int)(n - 5), name);
                t = find_marked(ld, alt);
            }
        }
    }
    if (!t)
        return kst_fail(ld->err, KST_ERR_SHAPE, "%s: missing tensor \"%s\"", ld->st->path, name);
    size_t shape[2] = {d0, d1};
    return kst_st_tensor_to_f32(ld->st, t, ndim, shape, dst, ld->err);
}

/* Tensors a checkpoint may carry that the encoders never read. */
static int ignorable(const char *rel) {
    return strcmp(rel, "embeddings.position_ids") == 0 || strncmp(rel, "cls.", 4) == 0 ||
           strncmp(rel, "vocab_", 6) == 0 || strncmp(rel, "pooler.", 7) == 0 ||
           strncmp(rel, "lm_head.", 8) == 0;
}

static int load_bert_layers(loader *ld, kst_bert *m) {
    const kst_bert_config *c = &m->cfg;
    kst_bert_params *p = &m->params;
    size_t C = c->C, FF = c->FF;
    int rc = KST_OK;
    int bert = c->arch == KST_ARCH_BERT;
    KST_TRY(load(ld, p->wte, 2, c->V, C, "embeddings.word_embeddings.weight"));
    KST_TRY(load(ld, p->wpe, 2, c->P, C, "embeddings.position_embeddings.weight"));
    if (bert && c->TT) KST_TRY(load(ld, p->wtt, 2, c->TT, C, "embeddings.token_type_embeddings.weight"));
    KST_TRY(load(ld, p->emblnw, 1, C, 0, "embeddings.LayerNorm.weight"));
    KST_TRY(load(ld, p->emblnb, 1, C, 0, "embeddings.LayerNorm.bias"));
    static const char *bert_qkv[3] = {"query", "key", "value"};
    static const char *dist_qkv[3] = {"q_lin", "k_lin", "v_lin"};
    for (size_t l = 0; l < c->L; l++) {
        for (int k = 0; k < 3; k++) {
            float *w = p->qkvw + (l * 3 + (size_t)k) * C * C;
            float *b = p->qkvb + (l * 3 + (size_t)k) * C;
            if (bert) {
                KST_TRY(load(ld, w, 2, C, C, "encoder.layer.%zu.attention.self.%s.weight", l, bert_qkv[k]));
                KST_TRY(load(ld, b, 1, C, 0, "encoder.layer.%zu.attention.self.%s.bias", l, bert_qkv[k]));
            } else {
                KST_TRY(load(ld, w, 2, C, C, "transformer.layer.%zu.attention.%s.weight", l, dist_qkv[k]));
                KST_TRY(load(ld, b, 1, C, 0, "transformer.layer.%zu.attention.%s.bias", l, dist_qkv[k]));
            }
        }
        /* Per-layer names: BERT first, DistilBERT second. */
        const char *names[10][2] = {
            {"encoder.layer.%zu.attention.output.dense.weight", "transformer.layer.%zu.attention.out_lin.weight"},
            {"encoder.layer.%zu.attention.output.dense.bias", "transformer.layer.%zu.attention.out_lin.bias"},
            {"encoder.layer.%zu.attention.output.LayerNorm.weight", "transformer.layer.%zu.sa_layer_norm.weight"},
            {"encoder.layer.%zu.attention.output.LayerNorm.bias", "transformer.layer.%zu.sa_layer_norm.bias"},
            {"encoder.layer.%zu.intermediate.dense.weight", "transformer.layer.%zu.ffn.lin1.weight"},
            {"encoder.layer.%zu.intermediate.dense.bias", "transformer.layer.%zu.ffn.lin1.bias"},
            {"encoder.layer.%zu.output.dense.weight", "transformer.layer.%zu.ffn.lin2.weight"},
            {"encoder.layer.%zu.output.dense.bias", "transformer.layer.%zu.ffn.lin2.bias"},
            {"encoder.layer.%zu.output.LayerNorm.weight", "transformer.layer.%zu.output_layer_norm.weight"},
            {"encoder.layer.%zu.output.LayerNorm.bias", "transformer.layer.%zu.output_layer_norm.bias"}};
        struct { float *dst; int nd; size_t d0, d1; } tgt[10] = {
            {p->attprojw + l * C * C, 2, C, C}, {p->attprojb + l * C, 1, C, 0},
            {p->ln1w + l * C, 1, C, 0},         {p->ln1b + l * C, 1, C, 0},
            {p->fcw + l * FF * C, 2, FF, C},    {p->fcb + l * FF, 1, FF, 0},
            {p->fcprojw + l * C * FF, 2, C, FF}, {p->fcprojb + l * C, 1, C, 0},
            {p->ln2w + l * C, 1, C, 0},         {p->ln2b + l * C, 1, C, 0}};
        for (int k = 0; k < 10; k++) {
            char fmt[128];
            snprintf(fmt, sizeof fmt, "%s", names[k][bert ? 0 : 1]);
            KST_TRY(load(ld, tgt[k].dst, tgt[k].nd, tgt[k].d0, tgt[k].d1, fmt, l));
        }
    }
done:
    return rc;
}

/* Loads a tensor named without the model prefix (heads live beside "bert.", not under it). */
static int load_head(loader *ld, float *dst, int ndim, size_t d0, size_t d1, const char *name) {
    const char *saved = ld->prefix;
    ld->prefix = "";
    int rc = load(ld, dst, ndim, d0, d1, "%s", name);
    ld->prefix = saved;
    return rc;
}

int kst_bert_load_weights(kst_bert *m, const kst_safetensors *st, kst_error *err) {
    const kst_bert_config *c = &m->cfg;
    loader ld = {st, "", NULL, err};
    int rc = KST_OK;
    ld.used = kst_calloc(st->n ? st->n : 1, 1, "tensor table", err);
    if (!ld.used) return KST_ERR_NOMEM;
    static const char *prefixes[] = {"", "bert.", "distilbert.", "model.", "0.auto_model."};
    int found = 0;
    for (size_t i = 0; i < sizeof prefixes / sizeof prefixes[0]; i++) {
        char name[128];
        snprintf(name, sizeof name, "%sembeddings.word_embeddings.weight", prefixes[i]);
        if (kst_safetensors_find(st, name)) {
            ld.prefix = prefixes[i];
            found = 1;
            break;
        }
    }
    if (!found) {
        rc = kst_fail(err, KST_ERR_SHAPE,
                      "%s: missing tensor \"embeddings.word_embeddings.weight\" (with or without a "
                      "bert./distilbert. prefix): not a BERT or DistilBERT checkpoint",
                      st->path);
        goto done;
    }
    KST_TRY(load_bert_layers(&ld, m));
    kst_bert_params *p = &m->params;
    if (c->pool_dim) {
        if (c->arch == KST_ARCH_BERT) {
            KST_TRY(load(&ld, p->poolw, 2, c->pool_dim, c->C, "pooler.dense.weight"));
            KST_TRY(load(&ld, p->poolb, 1, c->pool_dim, 0, "pooler.dense.bias"));
        } else {
            KST_TRY(load_head(&ld, p->poolw, 2, c->pool_dim, c->C, "pre_classifier.weight"));
            KST_TRY(load_head(&ld, p->poolb, 1, c->pool_dim, 0, "pre_classifier.bias"));
        }
    }
    if (p->clsw) {
        KST_TRY(load_head(&ld, p->clsw, 2, c->NL, c->pool_dim ? c->pool_dim : c->C, "classifier.weight"));
        KST_TRY(load_head(&ld, p->clsb, 1, c->NL, 0, "classifier.bias"));
    }
    if (c->proj_dim) KST_TRY(load_head(&ld, p->projw, 2, c->proj_dim, c->C, "linear.weight"));
    /* Anything left inside the model's namespace means the checkpoint and config disagree
     * (more layers than configured, a renamed tensor): refuse rather than silently ignore it. */
    size_t plen = strlen(ld.prefix);
    for (size_t i = 0; i < st->n; i++) {
        const char *name = st->tensors[i].name;
        if (ld.used[i] || strncmp(name, ld.prefix, plen) != 0) continue;
        const char *rel = name + plen;
        if (ignorable(rel)) continue;
        if (plen == 0 && (strncmp(rel, "classifier.", 11) == 0 || strncmp(rel, "pre_classifier.", 15) == 0 ||
                          strcmp(rel, "linear.weight") == 0))
            continue; /* a head this role does not use */
        rc = kst_fail(err, KST_ERR_SHAPE,
                      "%s: unexpected tensor \"%s\" (not part of a %zu-layer %s model)", st->path,
                      name, c->L, c->arch == KST_ARCH_BERT ? "BERT" : "DistilBERT");
        goto done;
    }
done:
    kst_free(ld.used);
    return rc;
}

int kst_bert_load_dense(kst_bert *m, const kst_safetensors *st, kst_error *err) {
    loader ld = {st, "", NULL, err};
    ld.used = kst_calloc(st->n ? st->n : 1, 1, "tensor table", err);
    if (!ld.used) return KST_ERR_NOMEM;
    int rc = load(&ld, m->params.densew, 2, m->cfg.dense_out, m->cfg.dense_in, "linear.weight");
    if (rc == KST_OK) rc = load(&ld, m->params.denseb, 1, m->cfg.dense_out, 0, "linear.bias");
    kst_free(ld.used);
    return rc;
}

/* ------------------------------------------------------------------------------------------ */
/* forward */

void kst_bert_acts_free(kst_bert_acts *a) {
    if (!a) return;
    kst_free(a->qkv);
    kst_free(a->atty);
    kst_free(a->tmp);
    kst_free(a->ff);
    kst_free(a->scratch);
    memset(a, 0, sizeof *a);
}

static int acts_reserve(const kst_bert_config *c, kst_bert_acts *a, size_t BT, size_t T,
                        kst_error *err) {
    int rc = KST_OK;
    if (BT > a->cap_tokens) {
        KST_TRY(kst_realloc((void **)&a->qkv, BT * 3, c->C * sizeof(float), "activations", err));
        KST_TRY(kst_realloc((void **)&a->atty, BT, c->C * sizeof(float), "activations", err));
        KST_TRY(kst_realloc((void **)&a->tmp, BT, c->C * sizeof(float), "activations", err));
        KST_TRY(kst_realloc((void **)&a->ff, BT, c->FF * sizeof(float), "activations", err));
        a->cap_tokens = BT;
    }
    size_t need = kst_attention_scratch_floats(T);
    if (need > a->cap_scratch) {
        KST_TRY(kst_realloc((void **)&a->scratch, need, sizeof(float), "attention scratch", err));
        a->cap_scratch = need;
    }
done:
    return rc;
}

int kst_bert_check_ids(const kst_bert_config *c, const int32_t *ids, const int32_t *type_ids, size_t BT, size_t T,
                       kst_error *err) {
    for (size_t i = 0; i < BT; i++) {
        if (ids[i] < 0 || (size_t)ids[i] >= c->V)
            return kst_fail(err, KST_ERR_INVALID, "token id %d at position %zu is outside the %zu-token vocabulary",
                            ids[i], i % T, c->V);
        /* DistilBERT has no token types: the tokenizer's segment ids are ignored, as there. */
        if (c->TT && type_ids && (type_ids[i] < 0 || (size_t)type_ids[i] >= c->TT))
            return kst_fail(err, KST_ERR_INVALID, "token type %d at position %zu exceeds type_vocab_size %zu",
                            type_ids[i], i % T, c->TT);
    }
    return KST_OK;
}

int kst_bert_forward(const kst_bert *m, kst_bert_acts *a, float *out, const int32_t *ids,
                     const int32_t *type_ids, const int *valid, size_t B, size_t T,
                     kst_error *err) {
    const kst_bert_config *c = &m->cfg;
    const kst_bert_params *p = &m->params;
    size_t C = c->C, FF = c->FF, BT = B * T;
    if (T > c->P)
        return kst_fail(err, KST_ERR_INVALID, "sequence of %zu tokens exceeds the model's %zu positions",
                        T, c->P);
    int rc = kst_bert_check_ids(c, ids, type_ids, BT, T, err);
    if (rc != KST_OK) return rc;
    rc = acts_reserve(c, a, BT, T, err);
    if (rc != KST_OK) return rc;
    /* embeddings: word + position (+ token type), then LayerNorm */
#pragma omp parallel for if (BT > 64)
    for (size_t i = 0; i < BT; i++) {
        size_t t = i % T;
        float *x = out + i * C;
        const float *we = p->wte + (size_t)ids[i] * C, *pe = p->wpe + t * C;
        if (c->TT) {
            const float *te = p->wtt + (size_t)(type_ids ? type_ids[i] : 0) * C;
            for (size_t k = 0; k < C; k++) x[k] = we[k] + te[k] + pe[k];
        } else {
            for (size_t k = 0; k < C; k++) x[k] = we[k] + pe[k];
        }
    }
    kst_layernorm_forward(out, NULL, NULL, out, p->emblnw, p->emblnb, BT, C, c->eps);
    for (size_t l = 0; l < c->L; l++) {
        kst_matmul_forward(a->qkv, out, p->qkvw + l * 3 * C * C, p->qkvb + l * 3 * C, BT, C, 3 * C);
        kst_attention_forward(a->atty, NULL, a->scratch, a->qkv, valid, B, T, C, c->NH);
        kst_matmul_forward(a->tmp, a->atty, p->attprojw + l * C * C, p->attprojb + l * C, BT, C, C);
        kst_residual_forward(a->tmp, a->tmp, out, BT * C);
        kst_layernorm_forward(out, NULL, NULL, a->tmp, p->ln1w + l * C, p->ln1b + l * C, BT, C, c->eps);
        kst_matmul_forward(a->ff, out, p->fcw + l * FF * C, p->fcb + l * FF, BT, C, FF);
        kst_act_forward(a->ff, a->ff, BT * FF, c->act);
        kst_matmul_forward(a->tmp, a->ff, p->fcprojw + l * C * FF, p->fcprojb + l * C, BT, FF, C);
        kst_residual_forward(a->tmp, a->tmp, out, BT * C);
        kst_layernorm_forward(out, NULL, NULL, a->tmp, p->ln2w + l * C, p->ln2b + l * C, BT, C, c->eps);
    }
    return KST_OK;
}
