/* checkpoint.c - an encoder's weights back to a Hugging Face checkpoint folder of its own layout.
 *
 * The source folder is the template: its safetensors headers say which tensors exist and what
 * they are called (prefix, gamma/beta spelling, pooler or not), and its other files are copied.
 * So a BertModel, a BertForMaskedLM body, a ColBERT HF_ColBERT, a sentence-transformers folder
 * or a *ForSequenceClassification keeps exactly the names its library loads. */
#include "checkpoint.h"

#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "core/check.h"
#include "core/file.h"
#include "core/mem.h"
#include "encoders/safetensors_write.h"

#define PATH_CAP 4096

/* ------------------------------------------------------------------------------------------ */
/* the parameters under their checkpoint names */

typedef struct slot {
    char name[256];
    const float *data;
    int ndim;
    size_t shape[2];
    int used;
} slot;

typedef struct slots {
    slot *v;
    size_t n, cap;
} slots;

static void add(slots *s, const float *data, size_t d0, size_t d1, const char *fmt, ...)
    KST_PRINTF(5, 6);
static void add(slots *s, const float *data, size_t d0, size_t d1, const char *fmt, ...) {
    if (s->n == s->cap) return; /* sized exactly by the caller; never reached */
    slot *t = &s->v[s->n++];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(t->name, sizeof t->name, fmt, ap);
    va_end(ap);
    t->data = data;
    t->ndim = d1 ? 2 : 1;
    t->shape[0] = d0;
    t->shape[1] = d1;
    t->used = 0;
}

/* Every tensor of m as kst_bert_load_weights names it, `prefix` on the transformer's (and the BERT
 * pooler's) names; heads (classifier, pre_classifier, ColBERT linear) have none, as in
 * transformers and colbert-ai. Slices of the stacked QKV are (C, C) blocks of qkvw. */
static int model_slots(const kst_bert *m, const char *pf, slots *s, kst_error *err) {
    const kst_bert_config *c = &m->cfg;
    const kst_bert_params *p = &m->params;
    size_t C = c->C, FF = c->FF;
    s->cap = 8 + 16 * c->L + 8;
    s->n = 0;
    s->v = kst_calloc(s->cap, sizeof *s->v, "checkpoint tensor table", err);
    if (!s->v) return KST_ERR_NOMEM;
    int bert = c->arch == KST_ARCH_BERT;
    add(s, p->wte, c->V, C, "%sembeddings.word_embeddings.weight", pf);
    add(s, p->wpe, c->P, C, "%sembeddings.position_embeddings.weight", pf);
    if (bert && c->TT) add(s, p->wtt, c->TT, C, "%sembeddings.token_type_embeddings.weight", pf);
    add(s, p->emblnw, C, 0, "%sembeddings.LayerNorm.weight", pf);
    add(s, p->emblnb, C, 0, "%sembeddings.LayerNorm.bias", pf);
    static const char *bq[3] = {"query", "key", "value"}, *dq[3] = {"q_lin", "k_lin", "v_lin"};
    for (size_t l = 0; l < c->L; l++) {
        for (int k = 0; k < 3; k++) {
            const float *w = p->qkvw + (l * 3 + (size_t)k) * C * C;
            const float *b = p->qkvb + (l * 3 + (size_t)k) * C;
            if (bert) {
                add(s, w, C, C, "%sencoder.layer.%zu.attention.self.%s.weight", pf, l, bq[k]);
                add(s, b, C, 0, "%sencoder.layer.%zu.attention.self.%s.bias", pf, l, bq[k]);
            } else {
                add(s, w, C, C, "%stransformer.layer.%zu.attention.%s.weight", pf, l, dq[k]);
                add(s, b, C, 0, "%stransformer.layer.%zu.attention.%s.bias", pf, l, dq[k]);
            }
        }
        const char *L0 = bert ? "encoder.layer" : "transformer.layer";
        const char *names[10][2] = {
            {"attention.output.dense.weight", "attention.out_lin.weight"},
            {"attention.output.dense.bias", "attention.out_lin.bias"},
            {"attention.output.LayerNorm.weight", "sa_layer_norm.weight"},
            {"attention.output.LayerNorm.bias", "sa_layer_norm.bias"},
            {"intermediate.dense.weight", "ffn.lin1.weight"},
            {"intermediate.dense.bias", "ffn.lin1.bias"},
            {"output.dense.weight", "ffn.lin2.weight"},
            {"output.dense.bias", "ffn.lin2.bias"},
            {"output.LayerNorm.weight", "output_layer_norm.weight"},
            {"output.LayerNorm.bias", "output_layer_norm.bias"}};
        struct { const float *d; size_t d0, d1; } tg[10] = {
            {p->attprojw + l * C * C, C, C}, {p->attprojb + l * C, C, 0},
            {p->ln1w + l * C, C, 0},         {p->ln1b + l * C, C, 0},
            {p->fcw + l * FF * C, FF, C},    {p->fcb + l * FF, FF, 0},
            {p->fcprojw + l * C * FF, C, FF}, {p->fcprojb + l * C, C, 0},
            {p->ln2w + l * C, C, 0},         {p->ln2b + l * C, C, 0}};
        for (int k = 0; k < 10; k++)
            add(s, tg[k].d, tg[k].d0, tg[k].d1, "%s%s.%zu.%s", pf, L0, l, names[k][bert ? 0 : 1]);
    }
    if (c->pool_dim) {
        if (bert) {
            add(s, p->poolw, c->pool_dim, C, "%spooler.dense.weight", pf);
            add(s, p->poolb, c->pool_dim, 0, "%spooler.dense.bias", pf);
        } else {
            add(s, p->poolw, c->pool_dim, C, "pre_classifier.weight");
            add(s, p->poolb, c->pool_dim, 0, "pre_classifier.bias");
        }
    }
    if (p->clsw) {
        add(s, p->clsw, c->NL, c->pool_dim ? c->pool_dim : C, "classifier.weight");
        add(s, p->clsb, c->NL, 0, "classifier.bias");
    }
    if (c->proj_dim) add(s, p->projw, c->proj_dim, C, "linear.weight");
    return KST_OK;
}

static int make_dirs(const char *path, kst_error *err);

/* The slot a source tensor name stands for: LayerNorm ".gamma"/".beta" (old checkpoints) are
 * the ".weight"/".bias" kst_bert_load_weights reads them as. */
static slot *find_slot(slots *s, const char *name) {
    char canon[300];
    size_t n = strlen(name);
    snprintf(canon, sizeof canon, "%s", name);
    if (strstr(name, "LayerNorm") || strstr(name, "layer_norm")) {
        if (n > 6 && strcmp(name + n - 6, ".gamma") == 0)
            snprintf(canon, sizeof canon, "%.*s.weight", (int)(n - 6), name);
        else if (n > 5 && strcmp(name + n - 5, ".beta") == 0)
            snprintf(canon, sizeof canon, "%.*s.bias", (int)(n - 5), name);
    }
    for (size_t i = 0; i < s->n; i++)
        if (strcmp(s->v[i].name, canon) == 0) return &s->v[i];
    return NULL;
}

/* One safetensors file to rewrite: the source's tensor list, mapped onto the parameters. */
typedef struct weight_file {
    kst_safetensors st;
    kst_st_out *outs; /* (st.n) */
    int has_meta;
} weight_file;

static void weight_file_free(weight_file *w) {
    kst_free(w->outs);
    kst_safetensors_close(&w->st);
    memset(w, 0, sizeof *w);
}

/* Reads src_path's tensor list and plans its rewrite: each tensor that has a slot is taken from
 * the slot, the rest are carried over. Every slot must be used. All the allocation of a save
 * happens here, before any file is written. */
static int plan_weights(const char *src_path, slots *s, weight_file *w, kst_error *err) {
    memset(w, 0, sizeof *w);
    int rc = kst_safetensors_open(src_path, &w->st, err);
    if (rc != KST_OK) {
        kst_error_prefix(err, "reading the source checkpoint's tensor list");
        return rc;
    }
    const kst_safetensors *st = &w->st;
    w->outs = kst_calloc(st->n ? st->n : 1, sizeof *w->outs, "checkpoint tensors", err);
    if (!w->outs) {
        rc = KST_ERR_NOMEM;
        goto done;
    }
    for (size_t i = 0; i < st->n; i++) {
        const kst_st_tensor *t = &st->tensors[i];
        kst_st_out *o = &w->outs[i];
        o->name = t->name;
        o->ndim = t->ndim;
        memcpy(o->shape, t->shape, sizeof o->shape);
        slot *sl = find_slot(s, t->name);
        if (sl) {
            int same = sl->used == 0 && t->ndim == sl->ndim && t->shape[0] == sl->shape[0] &&
                       (sl->ndim == 1 || t->shape[1] == sl->shape[1]);
            if (!same) {
                rc = kst_fail(err, KST_ERR_SHAPE,
                              "%s: tensor \"%s\" no longer matches the open model (changed on disk?)",
                              src_path, t->name);
                goto done;
            }
            sl->used = 1;
            o->dtype = "F32";
            o->src = KST_DT_F32;
            o->data = sl->data;
        } else if (t->dtype != KST_DT_OTHER) { /* unused float tensor: widened to F32 */
            o->dtype = "F32";
            o->src = t->dtype;
            o->data = t->data;
        } else { /* position_ids and the like: bytes as they are */
            o->dtype = t->dtype_name;
            o->src = KST_DT_OTHER;
            o->data = t->data;
            o->nbytes = t->count * kst_st_dtype_size(t->dtype_name);
        }
    }
    for (size_t i = 0; i < s->n; i++)
        if (!s->v[i].used) {
            rc = kst_fail(err, KST_ERR_SHAPE, "%s: has no tensor \"%s\" the open model holds (changed on disk?)",
                          src_path, s->v[i].name);
            goto done;
        }
    /* Keep the source's choice of metadata (transformers writes format "pt", sentence-transformers'
     * Dense writes none): with the same tensors the file then comes out byte for byte the same. */
    const unsigned char *m = st->map.data;
    size_t hlen = st->map.size > 8 ? (size_t)m[0] | (size_t)m[1] << 8 | (size_t)m[2] << 16 | (size_t)m[3] << 24 : 0;
    for (size_t i = 8; hlen <= st->map.size - 8 && i + 14 <= 8 + hlen && !w->has_meta; i++)
        w->has_meta = memcmp(m + i, "\"__metadata__\"", 14) == 0;
done:
    if (rc != KST_OK) weight_file_free(w);
    return rc;
}

/* Writes the planned file to dst_path, making its folder. */
static int write_weights(const weight_file *w, const char *dst_path, kst_error *err) {
    char sub[PATH_CAP];
    if ((size_t)snprintf(sub, sizeof sub, "%s", dst_path) >= sizeof sub)
        return kst_fail(err, KST_ERR_INVALID, "%s: path too long", dst_path);
    char *slash = strrchr(sub, '/');
    if (slash && slash != sub) {
        *slash = '\0';
        int rc = make_dirs(sub, err);
        if (rc != KST_OK) return rc;
    }
    return kst_safetensors_write(dst_path, w->outs, w->st.n, w->has_meta ? "pt" : NULL, err);
}

/* The prefix the loader found: the first that names the word embeddings in st. */
static const char *detect_prefix(const char *src_path, kst_error *err, int *rc) {
    kst_safetensors st;
    *rc = kst_safetensors_open(src_path, &st, err);
    if (*rc != KST_OK) return NULL;
    static const char *prefixes[] = {"", "bert.", "distilbert.", "model.", "0.auto_model."};
    const char *found = NULL;
    for (size_t i = 0; !found && i < sizeof prefixes / sizeof prefixes[0]; i++) {
        char name[128];
        snprintf(name, sizeof name, "%sembeddings.word_embeddings.weight", prefixes[i]);
        if (kst_safetensors_find(&st, name)) found = prefixes[i];
    }
    kst_safetensors_close(&st);
    if (!found)
        *rc = kst_fail(err, KST_ERR_SHAPE, "%s: no embeddings.word_embeddings.weight (changed on disk?)", src_path);
    return found;
}

/* ------------------------------------------------------------------------------------------ */
/* folders and files */

/* mkdir -p. */
static int make_dirs(const char *path, kst_error *err) {
    char buf[PATH_CAP];
    if ((size_t)snprintf(buf, sizeof buf, "%s", path) >= sizeof buf)
        return kst_fail(err, KST_ERR_INVALID, "%s: path too long", path);
    for (char *p = buf + 1;; p++) {
        if (*p == '/' || *p == '\0') {
            char c = *p;
            *p = '\0';
            struct stat sb;
            if (stat(buf, &sb) != 0) {
                if (mkdir(buf, 0755) != 0 && errno != EEXIST)
                    return kst_fail(err, KST_ERR_IO, "%s: cannot create folder: %s", buf, strerror(errno));
            } else if (!S_ISDIR(sb.st_mode)) {
                return kst_fail(err, KST_ERR_IO, "%s: exists and is not a folder", buf);
            }
            *p = c;
            if (!c) break;
        }
    }
    return KST_OK;
}

/* Absolute, symlink-free form of `path`, which need not exist yet (its missing tail is appended
 * to the resolved existing part). */
static int resolve(const char *path, char *out, size_t cap) {
    char tmp[PATH_MAX];
    if (realpath(path, tmp)) return (size_t)snprintf(out, cap, "%s", tmp) < cap ? 0 : -1;
    char parent[PATH_CAP];
    if ((size_t)snprintf(parent, sizeof parent, "%s", path) >= sizeof parent) return -1;
    size_t n = strlen(parent);
    while (n > 1 && parent[n - 1] == '/') parent[--n] = '\0';
    char *slash = strrchr(parent, '/');
    const char *base;
    if (!slash) {
        base = parent[0] ? parent : ".";
        if (!realpath(".", tmp)) return -1;
    } else {
        *slash = '\0';
        base = slash + 1;
        if (resolve(slash == parent ? "/" : parent, tmp, sizeof tmp) != 0) return -1;
    }
    if (strcmp(base, ".") == 0) return (size_t)snprintf(out, cap, "%s", tmp) < cap ? 0 : -1;
    return (size_t)snprintf(out, cap, "%s/%s", strcmp(tmp, "/") == 0 ? "" : tmp, base) < cap ? 0 : -1;
}

static int ends_with(const char *s, const char *suffix) {
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && strcmp(s + n - m, suffix) == 0;
}

/* Weight files of the old model: copying them would leave a loader a stale choice. */
static int is_weight_file(const char *name) {
    static const char *ext[] = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5",
                                ".msgpack", ".onnx", ".gguf", ".safetensors.index.json"};
    for (size_t i = 0; i < sizeof ext / sizeof ext[0]; i++)
        if (ends_with(name, ext[i])) return 1;
    return 0;
}

/* Rewrites "dtype"/"torch_dtype": "float16"|"bfloat16" as "float32" in config.json text, in
 * place of the value only, so the rest of the file stays byte for byte. */
static char *config_float32(const char *text, size_t len, size_t *out_len, kst_error *err) {
    char *out = kst_malloc(len + 64, 1, "config.json", err); /* each edit grows by at most 1 */
    if (!out) return NULL;
    size_t o = 0, edits = 0;
    for (size_t i = 0; i < len;) {
        const char *keys[2] = {"\"torch_dtype\"", "\"dtype\""};
        int done = 0;
        for (int k = 0; k < 2 && !done && edits < 60; k++) {
            size_t kl = strlen(keys[k]);
            if (len - i < kl || memcmp(text + i, keys[k], kl) != 0) continue;
            size_t j = i + kl;
            while (j < len && (text[j] == ' ' || text[j] == '\t' || text[j] == '\n' || text[j] == '\r')) j++;
            if (j >= len || text[j] != ':') continue;
            j++;
            while (j < len && (text[j] == ' ' || text[j] == '\t' || text[j] == '\n' || text[j] == '\r')) j++;
            const char *vals[2] = {"\"float16\"", "\"bfloat16\""};
            for (int v = 0; v < 2; v++) {
                size_t vl = strlen(vals[v]);
                if (len - j >= vl && memcmp(text + j, vals[v], vl) == 0) {
                    memcpy(out + o, text + i, j - i);
                    o += j - i;
                    memcpy(out + o, "\"float32\"", 9);
                    o += 9;
                    i = j + vl;
                    edits++;
                    done = 1;
                    break;
                }
            }
        }
        if (!done) out[o++] = text[i++];
    }
    *out_len = o;
    return out;
}

typedef struct copy_ctx {
    const char *src_root, *dst_root;
    const char *model_config; /* relative path of the transformer's config.json */
    const kst_encoder *e;
} copy_ctx;

static int copy_file(copy_ctx *cx, const char *rel, kst_error *err) {
    char src[PATH_CAP], dst[PATH_CAP];
    int rc = KST_OK;
    char *data = NULL, *patched = NULL;
    size_t len = 0;
    KST_TRY(kst_path_join(src, sizeof src, cx->src_root, rel, err));
    KST_TRY(kst_path_join(dst, sizeof dst, cx->dst_root, rel, err));
    KST_TRY(kst_read_file(src, &data, &len, err));
    if (strcmp(rel, cx->model_config) == 0) {
        size_t plen = 0;
        patched = config_float32(data, len, &plen, err);
        if (!patched) {
            rc = KST_ERR_NOMEM;
            goto done;
        }
        KST_TRY(kst_write_file_atomic(dst, patched, plen, err));
    } else {
        KST_TRY(kst_write_file_atomic(dst, data, len, err));
    }
done:
    kst_free(data);
    kst_free(patched);
    return rc;
}

/* Copies the folder `rel` ("" for the root) of the source tree, skipping hidden entries and
 * weight files; sorted by name so a failure always stops at the same place. */
static int copy_tree(copy_ctx *cx, const char *rel, int depth, kst_error *err) {
    char dir[PATH_CAP];
    int rc = KST_OK;
    struct dirent **names = NULL;
    int n = -1;
    if (depth > 16) return kst_fail(err, KST_ERR_INVALID, "%s/%s: folders nested too deep", cx->src_root, rel);
    if (*rel) KST_TRY(kst_path_join(dir, sizeof dir, cx->src_root, rel, err));
    else snprintf(dir, sizeof dir, "%s", cx->src_root);
    n = scandir(dir, &names, NULL, alphasort);
    if (n < 0) {
        rc = kst_fail(err, KST_ERR_IO, "%s: cannot list: %s", dir, strerror(errno));
        goto done;
    }
    for (int i = 0; i < n; i++) {
        const char *name = names[i]->d_name;
        if (name[0] == '.') continue;
        char sub[PATH_CAP], full[PATH_CAP];
        if (*rel) KST_TRY(kst_path_join(sub, sizeof sub, rel, name, err));
        else snprintf(sub, sizeof sub, "%s", name);
        KST_TRY(kst_path_join(full, sizeof full, cx->src_root, sub, err));
        struct stat sb;
        if (stat(full, &sb) != 0) continue; /* a dangling link */
        if (S_ISDIR(sb.st_mode)) {
            char out[PATH_CAP];
            KST_TRY(kst_path_join(out, sizeof out, cx->dst_root, sub, err));
            KST_TRY(make_dirs(out, err));
            KST_TRY(copy_tree(cx, sub, depth + 1, err));
        } else if (S_ISREG(sb.st_mode) && !is_weight_file(name)) {
            KST_TRY(copy_file(cx, sub, err));
        }
    }
done:
    for (int i = 0; i < n; i++) free(names[i]);
    free(names);
    return rc;
}

/* ------------------------------------------------------------------------------------------ */
/* API */

int kst_checkpoint_save(const kst_encoder *e, const char *out_dir, kst_error *err) {
    int rc = KST_OK;
    slots s = {0}, ds = {0};
    weight_file wf[2];
    memset(wf, 0, sizeof wf);
    char src_abs[PATH_CAP], out_abs[PATH_CAP];
    if (!e || !out_dir || !*out_dir)
        return kst_fail(err, KST_ERR_MISUSE, "kst_checkpoint_save: needs an encoder and an output folder");
    if (resolve(e->dir, src_abs, sizeof src_abs) != 0)
        return kst_fail(err, KST_ERR_IO, "%s: cannot resolve the source folder: %s", e->dir, strerror(errno));
    if (resolve(out_dir, out_abs, sizeof out_abs) != 0)
        return kst_fail(err, KST_ERR_IO, "%s: cannot resolve the output folder: %s", out_dir, strerror(errno));
    size_t sl = strlen(src_abs);
    if (strcmp(src_abs, out_abs) == 0 ||
        (strncmp(out_abs, src_abs, sl) == 0 && (out_abs[sl] == '/' || strcmp(src_abs, "/") == 0)))
        return kst_fail(err, KST_ERR_INVALID,
                        "%s: the output folder is the source checkpoint %s or inside it; choose "
                        "another folder (the source is never overwritten)",
                        out_dir, e->dir);
    /* Weight files as relative paths of the source tree. */
    const char *rel[2] = {NULL, NULL};
    size_t dl = strlen(e->dir);
    if (e->n_weight_files < 1 || e->n_weight_files > 2)
        return kst_fail(err, KST_ERR_MISUSE, "%s: the encoder records %zu weight files", e->dir, e->n_weight_files);
    for (size_t i = 0; i < e->n_weight_files; i++) {
        if (strncmp(e->weight_files[i], e->dir, dl) != 0 || e->weight_files[i][dl] != '/')
            return kst_fail(err, KST_ERR_INTERNAL, "%s: weight file %s is outside the folder", e->dir, e->weight_files[i]);
        rel[i] = e->weight_files[i] + dl + 1;
        while (*rel[i] == '/') rel[i]++; /* e->dir given with a trailing slash */
    }
    char model_config[PATH_CAP];
    const char *slash = strrchr(rel[0], '/');
    if (slash) snprintf(model_config, sizeof model_config, "%.*s/config.json", (int)(slash - rel[0]), rel[0]);
    else snprintf(model_config, sizeof model_config, "config.json");

    /* Plan both weight files first: every allocation and every check before the first write. */
    if (e->n_weight_files == 2) {
        ds.cap = 2;
        ds.v = kst_calloc(2, sizeof *ds.v, "checkpoint tensor table", err);
        if (!ds.v) {
            rc = KST_ERR_NOMEM;
            goto done;
        }
        add(&ds, e->bert.params.densew, e->bert.cfg.dense_out, e->bert.cfg.dense_in, "linear.weight");
        add(&ds, e->bert.params.denseb, e->bert.cfg.dense_out, 0, "linear.bias");
        KST_TRY(plan_weights(e->weight_files[1], &ds, &wf[1], err));
    }
    const char *prefix = detect_prefix(e->weight_files[0], err, &rc);
    if (rc != KST_OK) goto done;
    KST_TRY(model_slots(&e->bert, prefix, &s, err));
    KST_TRY(plan_weights(e->weight_files[0], &s, &wf[0], err));

    KST_TRY(make_dirs(out_dir, err));
    copy_ctx cx = {e->dir, out_dir, model_config, e};
    KST_TRY(copy_tree(&cx, "", 0, err));
    /* The Dense module's weights, then the model's: the main weights go last. */
    char dst[PATH_CAP];
    if (e->n_weight_files == 2) {
        KST_TRY(kst_path_join(dst, sizeof dst, out_dir, rel[1], err));
        KST_TRY(write_weights(&wf[1], dst, err));
    }
    KST_TRY(kst_path_join(dst, sizeof dst, out_dir, rel[0], err));
    KST_TRY(write_weights(&wf[0], dst, err));
done:
    weight_file_free(&wf[0]);
    weight_file_free(&wf[1]);
    kst_free(s.v);
    kst_free(ds.v);
    return rc;
}
