/* teacher.c - teacher-score readers (Hofstaetter TSV, matchmaker text, ColBERTv2 n-way JSONL),
 * id -> text maps, a seeded shuffle buffer with a resumable position, and the xoshiro256** RNG. */
#include "train/teacher.h"

#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "core/check.h"
#include "core/json.h"
#include "core/mem.h"
#include "core/stream.h"
#include "index/collection.h"

/* =============================================================================================
 * RNG: splitmix64 seeding, xoshiro256** 1.0
 * ============================================================================================= */

static uint64_t splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

void kst_xoshiro_seed(kst_xoshiro *r, uint64_t seed) {
    uint64_t x = seed;
    for (int i = 0; i < 4; i++) r->s[i] = splitmix64(&x);
}

uint64_t kst_xoshiro_next(kst_xoshiro *r) {
    uint64_t *s = r->s;
    uint64_t result = rotl(s[1] * 5, 7) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return result;
}

uint64_t kst_xoshiro_below(kst_xoshiro *r, uint64_t k) {
    if (k <= 1) return 0;
    uint64_t threshold = (0 - k) % k; /* 2^64 mod k */
    for (;;) {
        uint64_t x = kst_xoshiro_next(r);
        if (x >= threshold) return x % k;
    }
}

/* =============================================================================================
 * Text maps
 * ============================================================================================= */

#define ARENA_BLOCK ((size_t)64 << 20)

typedef struct map_entry {
    const char *id, *text;
    uint32_t id_len, text_len;
} map_entry;

struct kst_textmap {
    char *path;
    char **blocks;         /* arena blocks */
    size_t nblocks, cap_blocks;
    size_t block_used, block_size; /* of the last block */
    map_entry *entries;
    size_t count, cap;
    uint32_t *table;       /* entry index + 1, 0 = empty; size table_cap (power of two) */
    size_t table_cap;
};

static uint64_t hash_bytes(const char *p, size_t n) { /* FNV-1a, 64-bit */
    uint64_t h = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < n; i++) h = (h ^ (unsigned char)p[i]) * 0x100000001b3ULL;
    return h;
}

/* Room for n bytes in the arena; returns a pointer or NULL (err set). */
static char *arena_take(kst_textmap *m, size_t n, kst_error *err) {
    if (m->nblocks == 0 || m->block_size - m->block_used < n) {
        if (m->nblocks == m->cap_blocks) {
            size_t nc = m->cap_blocks ? 2 * m->cap_blocks : 8;
            if (kst_realloc((void **)&m->blocks, nc, sizeof *m->blocks, "text map blocks", err))
                return NULL;
            m->cap_blocks = nc;
        }
        size_t sz = n > ARENA_BLOCK ? n : ARENA_BLOCK;
        /* small maps (tests, query files) start with small blocks */
        if (m->nblocks < 6 && n <= ((size_t)64 << 10) << m->nblocks) sz = ((size_t)64 << 10) << m->nblocks;
        char *b = kst_malloc(sz, 1, "text map block", err);
        if (!b) return NULL;
        m->blocks[m->nblocks++] = b;
        m->block_size = sz;
        m->block_used = 0;
    }
    char *p = m->blocks[m->nblocks - 1] + m->block_used;
    m->block_used += n;
    return p;
}

static size_t map_slot(const kst_textmap *m, const char *id, size_t n, int *found) {
    size_t mask = m->table_cap - 1, i = (size_t)hash_bytes(id, n) & mask;
    for (;;) {
        uint32_t e = m->table[i];
        if (!e) {
            *found = 0;
            return i;
        }
        const map_entry *x = &m->entries[e - 1];
        if (x->id_len == n && memcmp(x->id, id, n) == 0) {
            *found = 1;
            return i;
        }
        i = (i + 1) & mask;
    }
}

static int map_grow_table(kst_textmap *m, kst_error *err) {
    size_t nc = m->table_cap ? 2 * m->table_cap : 1024;
    uint32_t *t = kst_calloc(nc, sizeof *t, "text map table", err);
    if (!t) return err ? err->code : KST_ERR_NOMEM;
    kst_free(m->table);
    m->table = t;
    m->table_cap = nc;
    for (size_t k = 0; k < m->count; k++) {
        int found;
        size_t s = map_slot(m, m->entries[k].id, m->entries[k].id_len, &found);
        m->table[s] = (uint32_t)(k + 1);
    }
    return KST_OK;
}

static int map_add(kst_textmap *m, const char *id, size_t id_len, const char *title,
                   size_t title_len, const char *text, size_t text_len, size_t line,
                   kst_error *err) {
    int rc;
    if (id_len > UINT32_MAX || title_len + text_len + 1 > UINT32_MAX)
        return kst_fail(err, KST_ERR_FORMAT, "%s: line %zu: record too long (4 GiB limit)", m->path,
                        line);
    if (m->count >= UINT32_MAX - 1)
        return kst_fail(err, KST_ERR_FORMAT, "%s: more than 4G records", m->path);
    if ((m->count + 1) * 2 > m->table_cap && (rc = map_grow_table(m, err))) return rc;
    int found;
    size_t slot = map_slot(m, id, id_len, &found);
    if (found)
        return kst_fail(err, KST_ERR_FORMAT, "%s: line %zu: duplicate id \"%.*s\" (seen on an earlier line)",
                        m->path, line, (int)(id_len > 64 ? 64 : id_len), id);
    if (m->count == m->cap) {
        size_t nc = m->cap ? 2 * m->cap : 256;
        if ((rc = kst_realloc((void **)&m->entries, nc, sizeof *m->entries, "text map entries", err)))
            return rc;
        m->cap = nc;
    }
    size_t tl = title_len ? title_len + 1 + text_len : text_len;
    char *p = arena_take(m, id_len + 1 + tl + 1, err);
    if (!p) return err ? err->code : KST_ERR_NOMEM;
    map_entry *e = &m->entries[m->count];
    memcpy(p, id, id_len);
    p[id_len] = '\0';
    e->id = p;
    e->id_len = (uint32_t)id_len;
    char *t = p + id_len + 1;
    e->text = t;
    if (title_len) {
        memcpy(t, title, title_len);
        t[title_len] = ' ';
        t += title_len + 1;
    }
    if (text_len) memcpy(t, text, text_len);
    t[text_len] = '\0';
    e->text_len = (uint32_t)tl;
    m->table[slot] = (uint32_t)(m->count + 1);
    m->count++;
    return KST_OK;
}

int kst_textmap_load(const char *path, int queries, kst_textmap **out, kst_error *err) {
    int rc = KST_OK;
    kst_docs *docs = NULL;
    kst_queries *qs = NULL;
    *out = NULL;
    kst_textmap *m = kst_calloc(1, sizeof *m, "text map", err);
    if (!m) return KST_ERR_NOMEM;
    if (!(m->path = kst_strndup(path, (size_t)-1, err))) {
        rc = KST_ERR_NOMEM;
        goto done;
    }
    KST_TRY(map_grow_table(m, err));
    if (queries) {
        KST_TRY(kst_queries_open(path, KST_FORMAT_AUTO, &qs, err));
        for (;;) {
            kst_query q;
            KST_TRY(kst_queries_next(qs, &q, err));
            if (!q.id) break;
            KST_TRY(map_add(m, q.id, q.id_len, NULL, 0, q.text, q.text_len, q.line, err));
        }
    } else {
        KST_TRY(kst_docs_open(path, KST_FORMAT_AUTO, &docs, err));
        for (;;) {
            kst_doc d;
            KST_TRY(kst_docs_next(docs, &d, err));
            if (!d.id) break;
            KST_TRY(map_add(m, d.id, d.id_len, d.title, d.title_len, d.text, d.text_len, d.line,
                            err));
        }
    }
done:
    kst_docs_close(docs);
    kst_queries_close(qs);
    if (rc != KST_OK) {
        kst_textmap_free(m);
        return rc;
    }
    *out = m;
    return KST_OK;
}

int kst_textmap_find(const kst_textmap *m, const char *id, size_t id_len, const char **text,
                     size_t *len) {
    int found;
    size_t s = map_slot(m, id, id_len, &found);
    if (!found) return 0;
    const map_entry *e = &m->entries[m->table[s] - 1];
    *text = e->text;
    *len = e->text_len;
    return 1;
}

size_t kst_textmap_count(const kst_textmap *m) { return m->count; }
const char *kst_textmap_path(const kst_textmap *m) { return m->path; }

void kst_textmap_free(kst_textmap *m) {
    if (!m) return;
    for (size_t i = 0; i < m->nblocks; i++) kst_free(m->blocks[i]);
    kst_free(m->blocks);
    kst_free(m->entries);
    kst_free(m->table);
    kst_free(m->path);
    kst_free(m);
}

/* =============================================================================================
 * Teacher readers: types
 * ============================================================================================= */

/* One parsed record held by the reader. texts[0] is the query, texts[1..n] the passages. */
typedef struct slot {
    size_t line;
    size_t n;
    char *buf;           /* matchmaker: the line, tabs turned into NULs */
    size_t buf_cap;
    const char **texts;  /* (cap) */
    size_t *lens;        /* (cap) */
    float *scores;       /* (cap - 1) */
    size_t cap;
} slot;

struct kst_teacher {
    kst_teacher_opts o;
    char *path;
    kst_stream *s;
    kst_xoshiro rng;
    size_t K;            /* buffer size, >= 1 */
    slot *slots;         /* (K) */
    size_t count;        /* slots in use */
    slot out;            /* the record last handed out */
    size_t lines_read, records_read, emitted;
    size_t nway;         /* passages per record once known (0: not yet) */
    int failed;
    kst_error sticky;
};

static const char *const HOF_COLS[5] = {"pos_score", "neg_score", "qid", "pos_pid", "neg_pid"};
static const char *const MM_COLS[5] = {"pos_score", "neg_score", "query", "pos_text", "neg_text"};

/* =============================================================================================
 * Parsing
 * ============================================================================================= */

static int slot_reserve(slot *s, size_t n, kst_error *err) {
    if (n + 1 <= s->cap) return KST_OK;
    size_t nc = n + 1 < 8 ? 8 : 2 * (n + 1);
    int rc;
    if ((rc = kst_realloc((void **)&s->texts, nc, sizeof *s->texts, "teacher record", err)) ||
        (rc = kst_realloc((void **)&s->lens, nc, sizeof *s->lens, "teacher record", err)) ||
        (rc = kst_realloc((void **)&s->scores, nc, sizeof *s->scores, "teacher record", err)))
        return rc;
    s->cap = nc;
    return KST_OK;
}

static void slot_free(slot *s) {
    kst_free(s->buf);
    kst_free(s->texts);
    kst_free(s->lens);
    kst_free(s->scores);
    memset(s, 0, sizeof *s);
}

/* Parses a score field of n bytes: a finite number in float range. */
static int parse_score(const kst_teacher *r, size_t line, const char *p, size_t n, int col,
                       const char *colname, float *out, kst_error *err) {
    char buf[64];
    int shown = (int)(n > 40 ? 40 : n);
    if (n == 0)
        return kst_fail(err, KST_ERR_FORMAT, "%s: line %zu: column %d (%s) is empty, expected a number",
                        r->path, line, col, colname);
    if (n >= sizeof buf) goto not_number;
    memcpy(buf, p, n);
    buf[n] = '\0';
    char *end;
    double v = strtod(buf, &end);
    if (end != buf + n || buf[0] == ' ' || buf[0] == '\t') goto not_number;
    if (isnan(v) || isinf(v))
        return kst_fail(err, KST_ERR_FORMAT,
                        "%s: line %zu: column %d (%s) is \"%s\": teacher scores must be finite numbers",
                        r->path, line, col, colname, buf);
    if (!isfinite((float)v))
        return kst_fail(err, KST_ERR_FORMAT, "%s: line %zu: column %d (%s) = %s is out of float range",
                        r->path, line, col, colname, buf);
    *out = (float)v;
    return KST_OK;
not_number:
    return kst_fail(err, KST_ERR_FORMAT, "%s: line %zu: column %d (%s): \"%.*s%s\" is not a number",
                    r->path, line, col, colname, shown, p, n > 40 ? "..." : "");
}

static int lookup(const kst_teacher *r, size_t line, const kst_textmap *m, const char *kind,
                  const char *where, const char *id, size_t n, const char **text, size_t *len,
                  kst_error *err) {
    if (n == 0)
        return kst_fail(err, KST_ERR_FORMAT, "%s: line %zu: %s: empty %s", r->path, line, where, kind);
    if (kst_textmap_find(m, id, n, text, len)) return KST_OK;
    return kst_fail(err, KST_ERR_FORMAT, "%s: line %zu: %s: unknown %s \"%.*s\" (not in %s)", r->path,
                    line, where, kind, (int)(n > 64 ? 64 : n), id, kst_textmap_path(m));
}

/* Splits a TSV line into exactly 5 fields (start, length); names a missing or extra column. */
static int split5(const kst_teacher *r, size_t line, const char *p, size_t len,
                  const char *const names[5], const char **f, size_t *fl, kst_error *err) {
    size_t k = 0, start = 0;
    for (size_t i = 0; i <= len; i++) {
        if (i == len || p[i] == '\t') {
            if (k == 5)
                return kst_fail(err, KST_ERR_FORMAT,
                                "%s: line %zu: more than 5 tab-separated columns (expected %s, %s, %s, %s, %s)",
                                r->path, line, names[0], names[1], names[2], names[3], names[4]);
            f[k] = p + start;
            fl[k] = i - start;
            k++;
            start = i + 1;
        }
    }
    if (k < 5)
        return kst_fail(err, KST_ERR_FORMAT,
                        "%s: line %zu: missing column %zu (%s): found %zu tab-separated columns, expected 5 (%s, %s, %s, %s, %s)",
                        r->path, line, k + 1, names[k], k, names[0], names[1], names[2], names[3],
                        names[4]);
    return KST_OK;
}

static int parse_hofstaetter(kst_teacher *r, slot *s, const char *p, size_t len, size_t line,
                             kst_error *err) {
    const char *f[5];
    size_t fl[5];
    int rc;
    if ((rc = split5(r, line, p, len, HOF_COLS, f, fl, err))) return rc;
    if ((rc = slot_reserve(s, 2, err))) return rc;
    for (int c = 0; c < 2; c++)
        if ((rc = parse_score(r, line, f[c], fl[c], c + 1, HOF_COLS[c], &s->scores[c], err)))
            return rc;
    if ((rc = lookup(r, line, r->o.queries, "qid", "column 3 (qid)", f[2], fl[2], &s->texts[0],
                     &s->lens[0], err)))
        return rc;
    if ((rc = lookup(r, line, r->o.collection, "pid", "column 4 (pos_pid)", f[3], fl[3],
                     &s->texts[1], &s->lens[1], err)))
        return rc;
    if ((rc = lookup(r, line, r->o.collection, "pid", "column 5 (neg_pid)", f[4], fl[4],
                     &s->texts[2], &s->lens[2], err)))
        return rc;
    s->n = 2;
    return KST_OK;
}

static int parse_matchmaker(kst_teacher *r, slot *s, const char *p, size_t len, size_t line,
                            kst_error *err) {
    const char *f[5];
    size_t fl[5];
    int rc;
    if ((rc = split5(r, line, p, len, MM_COLS, f, fl, err))) return rc;
    if ((rc = slot_reserve(s, 2, err))) return rc;
    for (int c = 0; c < 2; c++)
        if ((rc = parse_score(r, line, f[c], fl[c], c + 1, MM_COLS[c], &s->scores[c], err)))
            return rc;
    if (len + 1 > s->buf_cap) {
        if ((rc = kst_realloc((void **)&s->buf, len + 1, 1, "teacher line", err))) return rc;
        s->buf_cap = len + 1;
    }
    memcpy(s->buf, p, len);
    s->buf[len] = '\0';
    for (int c = 2; c < 5; c++) {
        size_t off = (size_t)(f[c] - p);
        s->buf[off + fl[c]] = '\0';
        s->texts[c - 2] = s->buf + off;
        s->lens[c - 2] = fl[c];
    }
    s->n = 2;
    return KST_OK;
}

static const char *json_kind(const cJSON *v) {
    if (cJSON_IsString(v)) return "a string";
    if (cJSON_IsNumber(v)) return "a number";
    if (cJSON_IsArray(v)) return "an array";
    if (cJSON_IsObject(v)) return "an object";
    if (cJSON_IsBool(v)) return "a boolean";
    if (cJSON_IsNull(v)) return "null";
    return "something else";
}

/* An id given as a JSON string or integer, as text in buf (or pointing into the JSON). */
static int json_id(const kst_teacher *r, size_t line, const cJSON *v, const char *what,
                   char *buf, size_t cap, const char **id, size_t *n, kst_error *err) {
    if (cJSON_IsString(v)) {
        *id = v->valuestring;
        *n = strlen(v->valuestring);
        return KST_OK;
    }
    if (cJSON_IsNumber(v)) {
        double d = v->valuedouble;
        if (d == floor(d) && fabs(d) < 9007199254740992.0) {
            *n = (size_t)snprintf(buf, cap, "%lld", (long long)d);
            *id = buf;
            return KST_OK;
        }
    }
    return kst_fail(err, KST_ERR_FORMAT, "%s: line %zu: %s must be a string or an integer, found %s",
                    r->path, line, what, json_kind(v));
}

static int parse_nway(kst_teacher *r, slot *s, const char *p, size_t len, size_t line,
                      kst_error *err) {
    const char *shape = "expected [qid, [pid, score], [pid, score], ...]";
    cJSON *root = NULL;
    kst_error e = {0};
    int rc = kst_json_parse(p, len, r->path, &root, &e);
    if (rc == KST_ERR_FORMAT) {
        const char *col = strstr(e.msg, ", column ");
        return kst_fail(err, rc, "%s: line %zu, column %ld: invalid JSON (%s)", r->path, line,
                        col ? strtol(col + 9, NULL, 10) : 0L, shape);
    }
    if (rc) {
        if (err) *err = e;
        return kst_error_prefix(err, "line %zu", line);
    }
    char idbuf[32];
    const char *id;
    size_t idn;
    if (!cJSON_IsArray(root)) {
        rc = kst_fail(err, KST_ERR_FORMAT, "%s: line %zu: found %s, %s", r->path, line,
                      json_kind(root), shape);
        goto done;
    }
    size_t pairs = (size_t)cJSON_GetArraySize(root);
    pairs = pairs ? pairs - 1 : 0;
    size_t want = r->o.nway ? r->o.nway : r->nway;
    if (pairs < 2) {
        rc = kst_fail(err, KST_ERR_FORMAT, "%s: line %zu: %zu [pid, score] pair%s, need at least 2 (%s)",
                      r->path, line, pairs, pairs == 1 ? "" : "s", shape);
        goto done;
    }
    if (r->o.nway && pairs < want) {
        rc = kst_fail(err, KST_ERR_FORMAT, "%s: line %zu: %zu [pid, score] pairs, nway is %zu",
                      r->path, line, pairs, want);
        goto done;
    }
    if (!r->o.nway && want && pairs != want) {
        rc = kst_fail(err, KST_ERR_FORMAT,
                      "%s: line %zu: %zu [pid, score] pairs, but earlier lines have %zu (set nway to use the first k)",
                      r->path, line, pairs, want);
        goto done;
    }
    size_t n = want ? want : pairs;
    if ((rc = slot_reserve(s, n, err))) goto done;
    cJSON *it = root->child;
    if ((rc = json_id(r, line, it, "element 1 (qid)", idbuf, sizeof idbuf, &id, &idn, err))) goto done;
    if ((rc = lookup(r, line, r->o.queries, "qid", "element 1", id, idn, &s->texts[0], &s->lens[0],
                     err)))
        goto done;
    it = it->next;
    for (size_t k = 0; k < n; k++, it = it->next) {
        char where[64];
        snprintf(where, sizeof where, "element %zu", k + 2);
        if (!cJSON_IsArray(it) || cJSON_GetArraySize(it) != 2) {
            rc = kst_fail(err, KST_ERR_FORMAT, "%s: line %zu: %s is %s, expected a [pid, score] pair",
                          r->path, line, where, cJSON_IsArray(it) ? "an array of other length" : json_kind(it));
            goto done;
        }
        char what[80];
        snprintf(what, sizeof what, "%s: the pid", where);
        if ((rc = json_id(r, line, it->child, what, idbuf, sizeof idbuf, &id, &idn, err))) goto done;
        if ((rc = lookup(r, line, r->o.collection, "pid", where, id, idn, &s->texts[k + 1],
                         &s->lens[k + 1], err)))
            goto done;
        const cJSON *sc = it->child->next;
        if (!cJSON_IsNumber(sc)) {
            rc = kst_fail(err, KST_ERR_FORMAT, "%s: line %zu: %s: the score is %s, expected a number",
                          r->path, line, where, json_kind(sc));
            goto done;
        }
        double v = sc->valuedouble;
        if (!isfinite(v) || !isfinite((float)v)) {
            rc = kst_fail(err, KST_ERR_FORMAT,
                          "%s: line %zu: %s: the score %g is not finite in float (teacher scores must be finite)",
                          r->path, line, where, v);
            goto done;
        }
        s->scores[k] = (float)v;
    }
    s->n = n;
    if (!r->nway) r->nway = n;
done:
    cJSON_Delete(root);
    return rc;
}

static int is_blank(const char *p, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (p[i] != ' ' && p[i] != '\t' && p[i] != '\r' && p[i] != '\f' && p[i] != '\v') return 0;
    return 1;
}

static int parse_line(kst_teacher *r, slot *s, const char *p, size_t len, size_t line,
                      kst_error *err) {
    s->line = line;
    switch (r->o.format) {
    case KST_TEACHER_HOFSTAETTER: return parse_hofstaetter(r, s, p, len, line, err);
    case KST_TEACHER_MATCHMAKER: return parse_matchmaker(r, s, p, len, line, err);
    case KST_TEACHER_NWAY: return parse_nway(r, s, p, len, line, err);
    }
    return kst_fail(err, KST_ERR_INVALID, "unknown teacher format %d", (int)r->o.format);
}

/* Reads the next record of the file into s; *got = 0 at the end. */
static int read_record(kst_teacher *r, slot *s, int *got, kst_error *err) {
    *got = 0;
    for (;;) {
        const char *line;
        size_t len;
        int rc = kst_stream_getline(r->s, &line, &len, err);
        if (rc) return rc;
        if (!line) return KST_OK;
        r->lines_read = kst_stream_lineno(r->s);
        if (is_blank(line, len)) continue;
        if ((rc = parse_line(r, s, line, len, r->lines_read, err))) return rc;
        r->records_read++;
        *got = 1;
        return KST_OK;
    }
}

/* =============================================================================================
 * Resume state
 * ============================================================================================= */

typedef struct line_slot {
    size_t line, slot;
} line_slot;

static int cmp_line_slot(const void *a, const void *b) {
    size_t x = ((const line_slot *)a)->line, y = ((const line_slot *)b)->line;
    return x < y ? -1 : x > y;
}

static int state_size(const cJSON *o, const char *key, size_t *out, kst_error *err) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    if (!cJSON_IsNumber(v) || v->valuedouble < 0 || v->valuedouble != floor(v->valuedouble) ||
        v->valuedouble > 9007199254740992.0)
        return kst_fail(err, KST_ERR_FORMAT, "resume state: \"%s\" must be a non-negative integer", key);
    *out = (size_t)v->valuedouble;
    return KST_OK;
}

/* Restores the position in `state` on a freshly opened reader (nothing read yet). */
static int restore(kst_teacher *r, const char *state, kst_error *err) {
    cJSON *o = NULL;
    line_slot *ls = NULL;
    int rc = kst_json_parse(state, strlen(state), "resume state", &o, err);
    if (rc) return rc;
    size_t version, K, nway, lines, records, emitted;
    if (!cJSON_IsObject(o)) {
        rc = kst_fail(err, KST_ERR_FORMAT, "resume state: expected a JSON object");
        goto done;
    }
    KST_TRY(state_size(o, "version", &version, err));
    if (version != 1) {
        rc = kst_fail(err, KST_ERR_UNSUPPORTED, "resume state: version %zu (this reader knows 1)", version);
        goto done;
    }
    const cJSON *fmt = cJSON_GetObjectItemCaseSensitive(o, "format");
    if (!cJSON_IsString(fmt) || strcmp(fmt->valuestring, kst_teacher_format_name(r->o.format))) {
        rc = kst_fail(err, KST_ERR_INVALID, "resume state: format is %s, the reader's is %s",
                      cJSON_IsString(fmt) ? fmt->valuestring : "missing",
                      kst_teacher_format_name(r->o.format));
        goto done;
    }
    KST_TRY(state_size(o, "shuffle_buffer", &K, err));
    KST_TRY(state_size(o, "nway", &nway, err));
    KST_TRY(state_size(o, "lines_read", &lines, err));
    KST_TRY(state_size(o, "records_read", &records, err));
    KST_TRY(state_size(o, "records_emitted", &emitted, err));
    if (K != r->K) {
        rc = kst_fail(err, KST_ERR_INVALID, "resume state: shuffle buffer of %zu records, the reader's is %zu",
                      K, r->K);
        goto done;
    }
    const cJSON *rng = cJSON_GetObjectItemCaseSensitive(o, "rng");
    if (!cJSON_IsArray(rng) || cJSON_GetArraySize(rng) != 4) {
        rc = kst_fail(err, KST_ERR_FORMAT, "resume state: \"rng\" must be 4 hex strings");
        goto done;
    }
    int i = 0;
    for (const cJSON *w = rng->child; w; w = w->next, i++) {
        char *end;
        if (!cJSON_IsString(w) || strlen(w->valuestring) != 16 ||
            (r->rng.s[i] = strtoull(w->valuestring, &end, 16), *end)) {
            rc = kst_fail(err, KST_ERR_FORMAT, "resume state: \"rng\" word %d is not 16 hex digits", i + 1);
            goto done;
        }
    }
    const cJSON *buf = cJSON_GetObjectItemCaseSensitive(o, "buffer");
    size_t nb = cJSON_IsArray(buf) ? (size_t)cJSON_GetArraySize(buf) : 0;
    if (!cJSON_IsArray(buf) || nb > K) {
        rc = kst_fail(err, KST_ERR_FORMAT, "resume state: \"buffer\" must be an array of at most %zu line numbers", K);
        goto done;
    }
    if (nb && !(ls = kst_malloc(nb, sizeof *ls, "resume state", err))) {
        rc = KST_ERR_NOMEM;
        goto done;
    }
    size_t k = 0;
    for (const cJSON *w = buf->child; w; w = w->next, k++) {
        double d = cJSON_IsNumber(w) ? w->valuedouble : -1;
        if (d < 1 || d != floor(d) || d > (double)lines) {
            rc = kst_fail(err, KST_ERR_FORMAT, "resume state: buffer entry %zu is not a line number in 1..%zu",
                          k + 1, lines);
            goto done;
        }
        ls[k].line = (size_t)d;
        ls[k].slot = k;
    }
    if (nb) qsort(ls, nb, sizeof *ls, cmp_line_slot);
    for (k = 1; k < nb; k++)
        if (ls[k].line == ls[k - 1].line) {
            rc = kst_fail(err, KST_ERR_FORMAT, "resume state: line %zu is buffered twice", ls[k].line);
            goto done;
        }
    r->nway = nway;
    /* Re-read lines 1..lines, parsing only the buffered ones into their slots. */
    size_t next = 0;
    while (r->lines_read < lines) {
        const char *line;
        size_t len;
        KST_TRY(kst_stream_getline(r->s, &line, &len, err));
        if (!line) {
            rc = kst_fail(err, KST_ERR_FORMAT, "%s: has %zu lines, the resume state was saved after line %zu (not the same file?)",
                          r->path, r->lines_read, lines);
            goto done;
        }
        r->lines_read = kst_stream_lineno(r->s);
        if (next < nb && ls[next].line == r->lines_read) {
            if (is_blank(line, len)) {
                rc = kst_fail(err, KST_ERR_FORMAT, "%s: line %zu is blank but the resume state buffers it (not the same file?)",
                              r->path, r->lines_read);
                goto done;
            }
            KST_TRY(parse_line(r, &r->slots[ls[next].slot], line, len, r->lines_read, err));
            next++;
        }
    }
    r->count = nb;
    r->records_read = records;
    r->emitted = emitted;
done:
    kst_free(ls);
    cJSON_Delete(o);
    return rc;
}

int kst_teacher_state(const kst_teacher *r, char **json, kst_error *err) {
    *json = NULL;
    if (r->failed) return kst_fail(err, KST_ERR_MISUSE, "%s: the reader has failed; it has no position to save", r->path);
    /* Upper bound: fixed part plus 21 bytes per buffered line number. */
    size_t cap = 512 + strlen(kst_teacher_format_name(r->o.format)) + r->count * 22;
    char *p = kst_malloc(cap, 1, "resume state", err);
    if (!p) return KST_ERR_NOMEM;
    int w = snprintf(p, cap,
                     "{\"version\": 1, \"format\": \"%s\", \"shuffle_buffer\": %zu, \"nway\": %zu, "
                     "\"lines_read\": %zu, \"records_read\": %zu, \"records_emitted\": %zu, "
                     "\"rng\": [\"%016" PRIx64 "\", \"%016" PRIx64 "\", \"%016" PRIx64 "\", \"%016" PRIx64
                     "\"], \"buffer\": [",
                     kst_teacher_format_name(r->o.format), r->K, r->nway, r->lines_read,
                     r->records_read, r->emitted, r->rng.s[0], r->rng.s[1], r->rng.s[2], r->rng.s[3]);
    size_t at = (size_t)w;
    for (size_t k = 0; k < r->count; k++)
        at += (size_t)snprintf(p + at, cap - at, "%s%zu", k ? ", " : "", r->slots[k].line);
    snprintf(p + at, cap - at, "]}");
    *json = p;
    return KST_OK;
}

/* =============================================================================================
 * API
 * ============================================================================================= */

const char *kst_teacher_format_name(kst_teacher_format f) {
    switch (f) {
    case KST_TEACHER_HOFSTAETTER: return "hofstaetter";
    case KST_TEACHER_MATCHMAKER: return "matchmaker";
    case KST_TEACHER_NWAY: return "nway";
    }
    return "?";
}

int kst_teacher_format_parse(const char *name, kst_teacher_format *out, kst_error *err) {
    for (int f = KST_TEACHER_HOFSTAETTER; f <= KST_TEACHER_NWAY; f++)
        if (name && strcmp(name, kst_teacher_format_name((kst_teacher_format)f)) == 0) {
            *out = (kst_teacher_format)f;
            return KST_OK;
        }
    return kst_fail(err, KST_ERR_INVALID,
                    "unknown teacher format \"%s\" (expected hofstaetter, matchmaker or nway)",
                    name ? name : "(null)");
}

int kst_teacher_open(const char *path, const kst_teacher_opts *opts, const char *resume,
                     kst_teacher **out, kst_error *err) {
    int rc = KST_OK;
    *out = NULL;
    if (opts->format < KST_TEACHER_HOFSTAETTER || opts->format > KST_TEACHER_NWAY)
        return kst_fail(err, KST_ERR_INVALID, "unknown teacher format %d", (int)opts->format);
    if (opts->format != KST_TEACHER_MATCHMAKER && (!opts->queries || !opts->collection))
        return kst_fail(err, KST_ERR_INVALID, "%s: the %s format needs a queries file and a collection",
                        path, kst_teacher_format_name(opts->format));
    if (opts->format == KST_TEACHER_NWAY && opts->nway == 1)
        return kst_fail(err, KST_ERR_INVALID, "nway must be 0 (all) or at least 2, not 1");
    kst_teacher *r = kst_calloc(1, sizeof *r, "teacher reader", err);
    if (!r) return KST_ERR_NOMEM;
    r->o = *opts;
    r->K = opts->no_shuffle || opts->shuffle_buffer < 1 ? 1 : opts->shuffle_buffer;
    kst_xoshiro_seed(&r->rng, opts->seed);
    if (!(r->path = kst_strndup(path, (size_t)-1, err)) ||
        !(r->slots = kst_calloc(r->K, sizeof *r->slots, "shuffle buffer", err))) {
        rc = KST_ERR_NOMEM;
        goto done;
    }
    KST_TRY(kst_stream_open(path, &r->s, err));
    if (resume) {
        KST_TRY(restore(r, resume, err));
    } else {
        while (r->count < r->K) {
            int got;
            KST_TRY(read_record(r, &r->slots[r->count], &got, err));
            if (!got) break;
            r->count++;
        }
        if (r->count == 0) {
            rc = kst_fail(err, KST_ERR_FORMAT, "%s: has no training rows (%zu lines, none a record)",
                          r->path, r->lines_read);
            goto done;
        }
    }
done:
    if (rc != KST_OK) {
        kst_teacher_close(r);
        return rc;
    }
    *out = r;
    return KST_OK;
}

int kst_teacher_next(kst_teacher *r, kst_teacher_record *rec, kst_error *err) {
    memset(rec, 0, sizeof *rec);
    if (r->failed) {
        if (err) *err = r->sticky;
        return r->sticky.code;
    }
    if (r->count == 0) return KST_OK;
    size_t j = r->K > 1 ? (size_t)kst_xoshiro_below(&r->rng, r->count) : 0;
    slot tmp = r->out;
    r->out = r->slots[j];
    r->slots[j] = tmp;
    int got = 0;
    int rc = read_record(r, &r->slots[j], &got, &r->sticky);
    if (rc) {
        /* the record in `out` was fine, but the position is lost: fail now and for good */
        r->failed = 1;
        r->sticky.code = rc;
        if (err) *err = r->sticky;
        return rc;
    }
    if (!got) {
        tmp = r->slots[j];
        r->slots[j] = r->slots[r->count - 1];
        r->slots[r->count - 1] = tmp;
        r->count--;
    }
    r->emitted++;
    const slot *s = &r->out;
    rec->query = s->texts[0];
    rec->query_len = s->lens[0];
    rec->n = s->n;
    rec->passages = s->texts + 1;
    rec->passage_lens = s->lens + 1;
    rec->scores = s->scores;
    rec->line = s->line;
    return KST_OK;
}

size_t kst_teacher_emitted(const kst_teacher *r) { return r->emitted; }

void kst_teacher_close(kst_teacher *r) {
    if (!r) return;
    if (r->slots)
        for (size_t k = 0; k < r->K; k++) slot_free(&r->slots[k]);
    slot_free(&r->out);
    kst_free(r->slots);
    kst_stream_close(r->s);
    kst_free(r->path);
    kst_free(r);
}
