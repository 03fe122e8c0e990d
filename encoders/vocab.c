/* vocab.c - WordPiece vocabulary: vocab.txt and tokenizer.json readers and the token hash table. */
#include "encoders/vocab.h"

#include <string.h>

#include <utf8proc.h>

#include "core/check.h"
#include "core/file.h"
#include "core/json.h"
#include "core/mem.h"

/* ---------------------------------------------------------------------------------------------
 * Hashing: FNV-1a over the bytes, continued across the "##" prefix and the piece so that a
 * continuation lookup never copies the piece.
 * ------------------------------------------------------------------------------------------- */

#define FNV_OFFSET 1469598103934665603ull
#define FNV_PRIME 1099511628211ull

static inline uint64_t fnv_add(uint64_t h, const char *s, size_t n) {
    const unsigned char *p = (const unsigned char *)s;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * FNV_PRIME;
    return h;
}

/* FNV's low bits mix poorly for short keys; fold the high half in before masking. */
static inline size_t slot_of(uint64_t h, size_t mask) { return (size_t)(h ^ (h >> 29)) & mask; }

int32_t kst_vocab_find(const kst_vocab *v, const char *prefix, size_t plen, const char *s,
                       size_t slen) {
    size_t n = plen + slen;
    if (n > v->max_len || !v->slots) return -1;
    uint64_t h = fnv_add(fnv_add(FNV_OFFSET, prefix, plen), s, slen);
    for (size_t i = slot_of(h, v->mask);; i = (i + 1) & v->mask) {
        int32_t id = v->slots[i];
        if (id < 0) return -1;
        if (v->len[id] != n) continue;
        const char *t = v->text + v->offset[id];
        if ((plen == 0 || memcmp(t, prefix, plen) == 0) && memcmp(t + plen, s, slen) == 0)
            return id;
    }
}

/* Sizes the table for v->n tokens and inserts ids 0 .. n-1 in order. Returns KST_OK, or stops at
 * the first duplicate with *dup (the later id) and *first (the earlier one) set. */
static int build_index(kst_vocab *v, int32_t *dup, int32_t *first, kst_error *err) {
    *dup = *first = -1;
    size_t cap = 16;
    while (cap < 2 * v->n) cap *= 2; /* load factor <= 1/2 keeps probe runs short */
    v->slots = kst_malloc(cap, sizeof *v->slots, "vocabulary hash table", err);
    if (!v->slots) return KST_ERR_NOMEM;
    memset(v->slots, 0xff, cap * sizeof *v->slots);
    v->mask = cap - 1;
    v->max_len = 0;
    for (size_t id = 0; id < v->n; id++)
        if (v->len[id] > v->max_len) v->max_len = v->len[id];
    for (size_t id = 0; id < v->n; id++) {
        const char *t = v->text + v->offset[id];
        size_t i = slot_of(fnv_add(FNV_OFFSET, t, v->len[id]), v->mask);
        for (;; i = (i + 1) & v->mask) {
            int32_t o = v->slots[i];
            if (o < 0) break;
            if (v->len[o] == v->len[id] && memcmp(v->text + v->offset[o], t, v->len[id]) == 0) {
                *dup = (int32_t)id;
                *first = o;
                return KST_ERR_FORMAT;
            }
        }
        v->slots[i] = (int32_t)id;
    }
    return KST_OK;
}

static int alloc_arrays(kst_vocab *v, size_t n, kst_error *err) {
    v->n = n;
    v->offset = kst_malloc(n, sizeof *v->offset, "vocabulary offsets", err);
    if (!v->offset) return KST_ERR_NOMEM;
    v->len = kst_malloc(n, sizeof *v->len, "vocabulary lengths", err);
    if (!v->len) return KST_ERR_NOMEM;
    return KST_OK;
}

void kst_vocab_free(kst_vocab *v) {
    if (!v) return;
    kst_free(v->text);
    kst_free(v->offset);
    kst_free(v->len);
    kst_free(v->slots);
    memset(v, 0, sizeof *v);
}

static int valid_utf8(const char *s, size_t n) {
    const utf8proc_uint8_t *p = (const utf8proc_uint8_t *)s;
    size_t i = 0;
    while (i < n) {
        if (p[i] < 0x80) {
            i++;
            continue;
        }
        utf8proc_int32_t cp;
        utf8proc_ssize_t k = utf8proc_iterate(p + i, (utf8proc_ssize_t)(n - i), &cp);
        if (k <= 0) return 0;
        i += (size_t)k;
    }
    return 1;
}

/* ---------------------------------------------------------------------------------------------
 * vocab.txt
 * ------------------------------------------------------------------------------------------- */

int kst_vocab_read_txt(kst_vocab *v, const char *path, kst_error *err) {
    memset(v, 0, sizeof *v);
    char *text = NULL;
    size_t size = 0;
    int rc = kst_read_file(path, &text, &size, err);
    if (rc != KST_OK) return rc;
    v->text = text;
    if (size >= UINT32_MAX) {
        rc = kst_fail(err, KST_ERR_FORMAT, "%s: %zu bytes; a vocabulary must be under 4 GiB", path,
                      size);
        goto done;
    }
    /* One token per line; the last line may lack its newline. */
    size_t n = 0;
    for (size_t i = 0; i < size; i++) n += text[i] == '\n';
    if (size > 0 && text[size - 1] != '\n') n++;
    if (n == 0) {
        rc = kst_fail(err, KST_ERR_FORMAT, "%s: empty; expected one WordPiece token per line", path);
        goto done;
    }
    KST_TRY(alloc_arrays(v, n, err));
    size_t start = 0;
    for (size_t id = 0; id < n; id++) {
        size_t end = start;
        while (end < size && text[end] != '\n') end++;
        size_t tend = end;
        if (tend > start && text[tend - 1] == '\r') tend--; /* CRLF */
        text[tend] = '\0';                                  /* the NUL at text[size] covers EOF */
        size_t line = id + 1;
        if (tend == start) {
            rc = kst_fail(err, KST_ERR_FORMAT, "%s: line %zu: empty line; expected a token", path,
                          line);
            goto done;
        }
        if (memchr(text + start, '\0', tend - start)) {
            rc = kst_fail(err, KST_ERR_FORMAT, "%s: line %zu: NUL byte inside a token", path, line);
            goto done;
        }
        if (!valid_utf8(text + start, tend - start)) {
            rc = kst_fail(err, KST_ERR_FORMAT, "%s: line %zu: invalid UTF-8; expected UTF-8 text",
                          path, line);
            goto done;
        }
        v->offset[id] = (uint32_t)start;
        v->len[id] = (uint32_t)(tend - start);
        start = end + 1;
    }
    int32_t dup, first;
    rc = build_index(v, &dup, &first, err);
    if (rc == KST_ERR_FORMAT)
        rc = kst_fail(err, KST_ERR_FORMAT,
                      "%s: line %d: duplicate token \"%.64s\" (first on line %d); expected each "
                      "token once",
                      path, dup + 1, v->text + v->offset[dup], first + 1);
done:
    if (rc != KST_OK) kst_vocab_free(v);
    return rc;
}

/* ---------------------------------------------------------------------------------------------
 * tokenizer.json's model.vocab
 * ------------------------------------------------------------------------------------------- */

int kst_vocab_from_json(kst_vocab *v, const cJSON *vocab, const char *where, kst_error *err) {
    memset(v, 0, sizeof *v);
    int rc = KST_OK;
    if (!cJSON_IsObject(vocab))
        return kst_fail(err, KST_ERR_FORMAT, "%s: \"model.vocab\" must be an object of token: id",
                        where);
    size_t n = 0, bytes = 0;
    const cJSON *e;
    cJSON_ArrayForEach(e, vocab) {
        n++;
        bytes += strlen(e->string) + 1;
    }
    if (n == 0)
        return kst_fail(err, KST_ERR_FORMAT, "%s: \"model.vocab\" is empty; expected tokens",
                        where);
    if (n > INT32_MAX || bytes >= UINT32_MAX)
        return kst_fail(err, KST_ERR_FORMAT, "%s: \"model.vocab\" is too large", where);
    KST_TRY(alloc_arrays(v, n, err));
    v->text = kst_malloc(bytes, 1, "vocabulary text", err);
    if (!v->text) {
        rc = KST_ERR_NOMEM;
        goto done;
    }
    /* offset doubles as a "seen" mark while filling: UINT32_MAX means no token has this id yet. */
    memset(v->offset, 0xff, n * sizeof *v->offset);
    size_t at = 0;
    cJSON_ArrayForEach(e, vocab) {
        double d = cJSON_IsNumber(e) ? e->valuedouble : -1;
        if (!(d >= 0 && d < (double)n && d == (double)(size_t)d)) {
            rc = kst_fail(err, KST_ERR_FORMAT,
                          "%s: \"model.vocab\": token \"%.64s\" has id %.17g; expected an integer "
                          "in 0..%zu",
                          where, e->string, cJSON_IsNumber(e) ? e->valuedouble : -1.0, n - 1);
            goto done;
        }
        size_t id = (size_t)d;
        if (v->offset[id] != UINT32_MAX) {
            rc = kst_fail(err, KST_ERR_FORMAT,
                          "%s: \"model.vocab\": id %zu is used by \"%.64s\" and \"%.64s\"; expected "
                          "each id once",
                          where, id, v->text + v->offset[id], e->string);
            goto done;
        }
        size_t len = strlen(e->string);
        if (!valid_utf8(e->string, len)) {
            rc = kst_fail(err, KST_ERR_FORMAT, "%s: \"model.vocab\": token with id %zu is not UTF-8",
                          where, id);
            goto done;
        }
        memcpy(v->text + at, e->string, len + 1);
        v->offset[id] = (uint32_t)at;
        v->len[id] = (uint32_t)len;
        at += len + 1;
    }
    /* n distinct ids in 0..n-1 cover them all, and JSON object keys that repeat are caught here. */
    int32_t dup, first;
    rc = build_index(v, &dup, &first, err);
    if (rc == KST_ERR_FORMAT)
        rc = kst_fail(err, KST_ERR_FORMAT,
                      "%s: \"model.vocab\": token \"%.64s\" appears twice (ids %d and %d)", where,
                      v->text + v->offset[dup], first, dup);
done:
    if (rc != KST_OK) kst_vocab_free(v);
    return rc;
}

/* ---------------------------------------------------------------------------------------------
 * A checkpoint folder: vocab.txt, tokenizer.json, tokenizer_config.json
 * ------------------------------------------------------------------------------------------- */

void kst_tokenizer_files_free(kst_tokenizer_files *f) {
    if (!f) return;
    kst_vocab_free(&f->vocab);
    for (int i = 0; i < KST_SP_COUNT; i++) kst_free(f->special[i]);
    for (size_t i = 0; i < f->n_added; i++) kst_free(f->added[i].text);
    kst_free(f->added);
    memset(f, 0, sizeof *f);
}

/* A special token in tokenizer_config.json is a string or an AddedToken object {"content": ...}. */
static int special_value(const cJSON *cfg, const char *key, char **slot, const char *where,
                         kst_error *err) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(cfg, key);
    if (!v || cJSON_IsNull(v)) return KST_OK;
    const char *s = NULL;
    if (cJSON_IsString(v)) {
        s = v->valuestring;
    } else if (cJSON_IsObject(v)) {
        const cJSON *c = cJSON_GetObjectItemCaseSensitive(v, "content");
        if (cJSON_IsString(c)) s = c->valuestring;
    }
    if (!s || !*s)
        return kst_fail(err, KST_ERR_FORMAT,
                        "%s: \"%s\" must be a non-empty string or an object with \"content\"",
                        where, key);
    char *copy = kst_strndup(s, (size_t)-1, err);
    if (!copy) return KST_ERR_NOMEM;
    kst_free(*slot);
    *slot = copy;
    return KST_OK;
}

/* true, false or null (null: -1, "follow lower-casing"). */
static int tristate(const cJSON *obj, const char *key, int *out, const char *where,
                    kst_error *err) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!v) return KST_OK;
    if (cJSON_IsNull(v)) {
        *out = -1;
        return KST_OK;
    }
    if (!cJSON_IsBool(v))
        return kst_fail(err, KST_ERR_FORMAT, "%s: \"%s\" must be true, false or null", where, key);
    *out = cJSON_IsTrue(v);
    return KST_OK;
}

static int read_config(const char *path, kst_tokenizer_files *f, kst_error *err) {
    cJSON *cfg = NULL;
    int rc = kst_json_load(path, &cfg, err);
    if (rc != KST_OK) return rc;
    if (!cJSON_IsObject(cfg)) {
        rc = kst_fail(err, KST_ERR_FORMAT, "%s: expected a JSON object", path);
        goto done;
    }
    /* transformers builds the normaliser from these keys, BertTokenizer's defaults filling the
     * absent ones, and ignores tokenizer.json's normalizer (checked with transformers 5.2). */
    kst_tokenizer_opts *o = &f->opts;
    o->do_lower_case = 1;
    o->strip_accents = -1;
    o->tokenize_chinese_chars = 1;
    KST_TRY(kst_json_bool(cfg, "do_lower_case", &o->do_lower_case, path, err));
    KST_TRY(tristate(cfg, "strip_accents", &o->strip_accents, path, err));
    KST_TRY(kst_json_bool(cfg, "tokenize_chinese_chars", &o->tokenize_chinese_chars, path, err));
    static const char *const keys[KST_SP_COUNT] = {"cls_token", "sep_token", "pad_token",
                                                   "unk_token", "mask_token"};
    for (int i = 0; i < KST_SP_COUNT; i++) KST_TRY(special_value(cfg, keys[i], &f->special[i], path, err));
    double mml = 0;
    KST_TRY(kst_json_num(cfg, "model_max_length", &mml, path, err));
    /* transformers writes 1e30 ("VERY_LARGE_INTEGER") when the model sets no limit. */
    f->model_max_length = (mml >= 1 && mml < 1e6) ? (size_t)mml : 0;
done:
    cJSON_Delete(cfg);
    return rc;
}

static int read_tokenizer_json(const char *path, int want_vocab, int want_normalizer,
                               kst_tokenizer_files *f, kst_error *err) {
    cJSON *root = NULL;
    int rc = kst_json_load(path, &root, err);
    if (rc != KST_OK) return rc;
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(root, "model");
    if (!cJSON_IsObject(model)) {
        rc = kst_fail(err, KST_ERR_FORMAT, "%s: expected a \"model\" object", path);
        goto done;
    }
    const char *type = NULL;
    KST_TRY(kst_json_str(model, "type", &type, path, err));
    if (!type) {
        rc = kst_fail(err, KST_ERR_FORMAT, "%s: \"model\" has no \"type\"; expected \"WordPiece\"",
                      path);
        goto done;
    }
    if (strcmp(type, "WordPiece") != 0) {
        rc = kst_fail(err, KST_ERR_UNSUPPORTED,
                      "%s: model type \"%.64s\" is not supported; expected \"WordPiece\" (BERT)",
                      path, type);
        goto done;
    }
    const char *unk = NULL, *prefix = NULL;
    KST_TRY(kst_json_str(model, "unk_token", &unk, path, err));
    KST_TRY(kst_json_str(model, "continuing_subword_prefix", &prefix, path, err));
    if (prefix) {
        if (strlen(prefix) >= sizeof f->prefix) {
            rc = kst_fail(err, KST_ERR_FORMAT,
                          "%s: \"continuing_subword_prefix\" is longer than %zu bytes", path,
                          sizeof f->prefix - 1);
            goto done;
        }
        strcpy(f->prefix, prefix);
    }
    long maxc = (long)f->opts.max_input_chars_per_word;
    KST_TRY(kst_json_int(model, "max_input_chars_per_word", &maxc, path, err));
    if (maxc < 0) {
        rc = kst_fail(err, KST_ERR_FORMAT, "%s: \"max_input_chars_per_word\" must be >= 0", path);
        goto done;
    }
    f->opts.max_input_chars_per_word = (size_t)maxc;
    if (unk && !f->special[KST_SP_UNK]) {
        f->special[KST_SP_UNK] = kst_strndup(unk, (size_t)-1, err);
        if (!f->special[KST_SP_UNK]) {
            rc = KST_ERR_NOMEM;
            goto done;
        }
    }

    const cJSON *norm = cJSON_GetObjectItemCaseSensitive(root, "normalizer");
    if (want_normalizer && norm && !cJSON_IsNull(norm)) {
        const char *ntype = NULL;
        KST_TRY(kst_json_str(norm, "type", &ntype, path, err));
        if (!ntype || strcmp(ntype, "BertNormalizer") != 0) {
            rc = kst_fail(err, KST_ERR_UNSUPPORTED,
                          "%s: normalizer type \"%.64s\" is not supported; expected "
                          "\"BertNormalizer\"",
                          path, ntype ? ntype : "(none)");
            goto done;
        }
        KST_TRY(kst_json_bool(norm, "lowercase", &f->opts.do_lower_case, path, err));
        KST_TRY(tristate(norm, "strip_accents", &f->opts.strip_accents, path, err));
        KST_TRY(kst_json_bool(norm, "handle_chinese_chars", &f->opts.tokenize_chinese_chars, path,
                              err));
        KST_TRY(kst_json_bool(norm, "clean_text", &f->opts.clean_text, path, err));
    }

    const cJSON *added = cJSON_GetObjectItemCaseSensitive(root, "added_tokens");
    if (cJSON_IsArray(added) && cJSON_GetArraySize(added) > 0) {
        size_t n = (size_t)cJSON_GetArraySize(added);
        f->added = kst_calloc(n, sizeof *f->added, "added tokens", err);
        if (!f->added) {
            rc = KST_ERR_NOMEM;
            goto done;
        }
        const cJSON *a;
        cJSON_ArrayForEach(a, added) {
            const char *content = NULL;
            long id = -1;
            KST_TRY(kst_json_str(a, "content", &content, path, err));
            KST_TRY(kst_json_int(a, "id", &id, path, err));
            if (!content || !*content || id < 0 || id > INT32_MAX) {
                rc = kst_fail(err, KST_ERR_FORMAT,
                              "%s: \"added_tokens\" entry %zu needs a \"content\" string and an "
                              "\"id\" >= 0",
                              path, f->n_added);
                goto done;
            }
            kst_added_token *t = &f->added[f->n_added];
            t->text = kst_strndup(content, (size_t)-1, err);
            if (!t->text) {
                rc = KST_ERR_NOMEM;
                goto done;
            }
            t->len = strlen(content);
            t->id = (int32_t)id;
            f->n_added++;
        }
    }

    if (want_vocab) {
        KST_TRY(kst_vocab_from_json(&f->vocab, cJSON_GetObjectItemCaseSensitive(model, "vocab"),
                                    path, err));
    }
done:
    cJSON_Delete(root);
    return rc;
}

int kst_tokenizer_files_read(const char *dir, kst_tokenizer_files *f, kst_error *err) {
    memset(f, 0, sizeof *f);
    f->opts = kst_tokenizer_opts_default();
    strcpy(f->prefix, "##");
    char vocab_path[4096], json_path[4096], cfg_path[4096];
    int rc;
    KST_TRY(kst_path_join(vocab_path, sizeof vocab_path, dir, "vocab.txt", err));
    KST_TRY(kst_path_join(json_path, sizeof json_path, dir, "tokenizer.json", err));
    KST_TRY(kst_path_join(cfg_path, sizeof cfg_path, dir, "tokenizer_config.json", err));
    int has_vocab = kst_path_exists(vocab_path), has_json = kst_path_exists(json_path);
    int has_cfg = kst_path_exists(cfg_path);
    if (!has_vocab && !has_json) {
        rc = kst_fail(err, KST_ERR_NOTFOUND,
                      "%s: no tokenizer found; expected vocab.txt (one WordPiece token per line) "
                      "or tokenizer.json (a WordPiece model), with an optional "
                      "tokenizer_config.json",
                      dir);
        goto done;
    }
    /* Special tokens first, so that tokenizer.json's model.unk_token only fills a gap. */
    if (has_cfg) KST_TRY(read_config(cfg_path, f, err));
    if (has_json) KST_TRY(read_tokenizer_json(json_path, !has_vocab, !has_cfg, f, err));
    if (has_vocab) KST_TRY(kst_vocab_read_txt(&f->vocab, vocab_path, err));
done:
    if (rc != KST_OK) kst_tokenizer_files_free(f);
    return rc;
}
