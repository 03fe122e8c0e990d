/* collection.c - document and query records from TSV, BEIR JSONL and Pyserini JSONL lines. */
#include "collection.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/check.h"
#include "core/json.h"
#include "core/mem.h"

/* ---------------------------------------------------------------------------------------------
 * Types
 * ------------------------------------------------------------------------------------------- */

/* One reader serves documents and queries; `queries` selects the record rules. */
struct kst_docs {
    kst_stream *s;
    int queries;
    kst_rec_format format;
    int tsv_cols;       /* 2 or 3 once the first TSV record is read, else 0 */
    size_t tsv_first;   /* line that fixed tsv_cols */
    const char *pending;/* first non-blank line, read by detection (valid until the next getline) */
    size_t pending_len;
    cJSON *json;        /* the current record's tree (strings point into it) */
    char *meta;         /* the current record's metadata, printed */
    char *copy;         /* the current TSV line, split in place */
    size_t copy_cap;
    kst_error failure;  /* sticky once code != KST_OK */
};

struct kst_queries {
    kst_docs r;
};

/* ---------------------------------------------------------------------------------------------
 * Helpers
 * ------------------------------------------------------------------------------------------- */

static int is_blank(const char *p, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (p[i] != ' ' && p[i] != '\t' && p[i] != '\r' && p[i] != '\f' && p[i] != '\v') return 0;
    return 1;
}

/* The next line that is not blank, or *line = NULL at the end. */
static int next_line(kst_docs *r, const char **line, size_t *len, kst_error *err) {
    if (r->pending) {
        *line = r->pending;
        *len = r->pending_len;
        r->pending = NULL;
        return KST_OK;
    }
    for (;;) {
        int rc = kst_stream_getline(r->s, line, len, err);
        if (rc != KST_OK || !*line) return rc;
        if (!is_blank(*line, *len)) return KST_OK;
    }
}

static size_t lineno(const kst_docs *r) { return kst_stream_lineno(r->s); }
static const char *name(const kst_docs *r) { return kst_stream_name(r->s); }

/* Checks an id: non-empty, valid UTF-8 (RFC 3629: no overlong forms, no surrogates, at most
 * U+10FFFF), no white space or control characters. Returns NULL or what is wrong; *at gets the
 * offending byte (0-based). */
static const char *id_problem(const unsigned char *p, size_t n, size_t *at) {
    *at = 0;
    if (n == 0) return "is empty";
    for (size_t i = 0; i < n;) {
        unsigned c = p[i];
        *at = i;
        if (c < 0x80) {
            if (c <= 0x20 || c == 0x7f) return "holds white space or a control character";
            i++;
            continue;
        }
        size_t k;
        unsigned cp, min;
        if (c >= 0xc2 && c <= 0xdf) k = 1, cp = c & 0x1f, min = 0x80;
        else if (c >= 0xe0 && c <= 0xef) k = 2, cp = c & 0x0f, min = 0x800;
        else if (c >= 0xf0 && c <= 0xf4) k = 3, cp = c & 0x07, min = 0x10000;
        else return "is not valid UTF-8";
        if (n - i <= k) return "is not valid UTF-8";
        for (size_t j = 1; j <= k; j++) {
            if ((p[i + j] & 0xc0) != 0x80) return "is not valid UTF-8";
            cp = cp << 6 | (p[i + j] & 0x3f);
        }
        if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return "is not valid UTF-8";
        if (cp == 0x85 || cp == 0xa0 || (cp >= 0x80 && cp < 0xa0))
            return "holds white space or a control character";
        i += k + 1;
    }
    return NULL;
}

static int check_id(kst_docs *r, const char *what, const char *id, size_t n, kst_error *err) {
    size_t at;
    const char *problem = id_problem((const unsigned char *)id, n, &at);
    if (!problem) return KST_OK;
    if (n == 0) return kst_fail(err, KST_ERR_FORMAT, "%s: line %zu: %s is empty", name(r), lineno(r), what);
    return kst_fail(err, KST_ERR_FORMAT, "%s: line %zu: %s %s (byte %zu of the id)", name(r),
                    lineno(r), what, problem, at + 1);
}

static const char *json_type(const cJSON *v) {
    if (cJSON_IsString(v)) return "a string";
    if (cJSON_IsNumber(v)) return "a number";
    if (cJSON_IsBool(v)) return "a boolean";
    if (cJSON_IsArray(v)) return "an array";
    if (cJSON_IsObject(v)) return "an object";
    if (cJSON_IsNull(v)) return "null";
    return "an unknown value";
}

/* What a line of the current format looks like, for messages. */
static const char *expected(const kst_docs *r) {
    if (r->queries) return "a BEIR query line {\"_id\", \"text\"}";
    if (r->format == KST_FORMAT_PYSERINI) return "a Pyserini line {\"id\", \"contents\"}";
    return "a BEIR corpus line {\"_id\", \"title\", \"text\"}";
}

/* Reads string member `key`. Absent or null: an error when required, else "" . */
static int json_string(kst_docs *r, const cJSON *obj, const char *key, int required,
                       const char **out, size_t *len, kst_error *err) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (!v || cJSON_IsNull(v)) {
        if (required)
            return kst_fail(err, KST_ERR_FORMAT, "%s: line %zu: missing \"%s\" (expected %s)",
                            name(r), lineno(r), key, expected(r));
        *out = "";
        *len = 0;
        return KST_OK;
    }
    if (!cJSON_IsString(v))
        return kst_fail(err, KST_ERR_FORMAT, "%s: line %zu: \"%s\" must be a string, found %s",
                        name(r), lineno(r), key, json_type(v));
    *out = v->valuestring;
    *len = strlen(v->valuestring);
    return KST_OK;
}

/* Parses one JSONL line into an object. kst_json_parse sees a one-line text, so its "line 1,
 * column C" is restated as the file's line and the column. */
static int parse_object(kst_docs *r, const char *line, size_t len, cJSON **out, kst_error *err) {
    kst_error e = {0};
    int rc = kst_json_parse(line, len, name(r), out, &e);
    if (rc == KST_ERR_FORMAT) {
        const char *col = strstr(e.msg, ", column ");
        if (col)
            return kst_fail(err, rc, "%s: line %zu, column %ld: invalid JSON (expected one object per line)",
                            name(r), lineno(r), strtol(col + 9, NULL, 10));
        kst_fail(err, rc, "%s", e.msg);
        return kst_error_prefix(err, "line %zu", lineno(r));
    }
    if (rc != KST_OK) {
        if (err) *err = e;
        return kst_error_prefix(err, "%s: line %zu", name(r), lineno(r));
    }
    if (!cJSON_IsObject(*out)) {
        rc = kst_fail(err, KST_ERR_FORMAT, "%s: line %zu: expected a JSON object, found %s",
                      name(r), lineno(r), json_type(*out));
        cJSON_Delete(*out);
        *out = NULL;
    }
    return rc;
}

static int count_tabs(const char *p, size_t n) {
    int tabs = 0;
    for (const char *q = p; (q = memchr(q, '\t', n - (size_t)(q - p))) != NULL; q++) tabs++;
    return tabs;
}

/* ---------------------------------------------------------------------------------------------
 * Record parsers
 * ------------------------------------------------------------------------------------------- */

static int parse_tsv(kst_docs *r, const char *line, size_t len, kst_doc *d, kst_error *err) {
    int cols = count_tabs(line, len) + 1;
    if (r->tsv_cols == 0) {
        int ok = r->queries ? cols == 2 : (cols == 2 || cols == 3);
        if (!ok)
            return kst_fail(err, KST_ERR_FORMAT,
                            "%s: line %zu: expected %s, found %d", name(r),
                            lineno(r),
                            r->queries ? "2 tab-separated columns (qid, text)"
                                       : "2 or 3 tab-separated columns (id, [title,] text)",
                            cols);
        r->tsv_cols = cols;
        r->tsv_first = lineno(r);
    } else if (cols != r->tsv_cols) {
        return kst_fail(err, KST_ERR_FORMAT,
                        "%s: line %zu: expected %d tab-separated columns (%s) as on line %zu, found %d",
                        name(r), lineno(r), r->tsv_cols,
                        r->tsv_cols == 3 ? "id, title, text" : r->queries ? "qid, text" : "id, text",
                        r->tsv_first, cols);
    }
    if (len + 1 > r->copy_cap) {
        void *p = r->copy;
        int rc = kst_realloc(&p, len + 1, 1, "TSV line", err);
        if (rc != KST_OK) return kst_error_prefix(err, "%s: line %zu", name(r), lineno(r));
        r->copy = p;
        r->copy_cap = len + 1;
    }
    memcpy(r->copy, line, len);
    r->copy[len] = '\0';
    char *f[3] = {r->copy, NULL, NULL};
    char *end = r->copy + len;
    for (int i = 1; i < cols; i++) {
        char *tab = memchr(f[i - 1], '\t', (size_t)(end - f[i - 1]));
        *tab = '\0';
        f[i] = tab + 1;
    }
    d->id = f[0];
    d->id_len = (size_t)(f[1] - f[0] - 1);
    if (cols == 3) {
        d->title = f[1];
        d->title_len = (size_t)(f[2] - f[1] - 1);
        d->text = f[2];
    } else {
        d->title = "";
        d->text = f[1];
    }
    d->text_len = (size_t)(end - d->text);
    return check_id(r, r->queries ? "the query id (column 1)" : "the id (column 1)", d->id,
                    d->id_len, err);
}

static int parse_json(kst_docs *r, const char *line, size_t len, kst_doc *d, kst_error *err) {
    int rc = parse_object(r, line, len, &r->json, err);
    if (rc != KST_OK) return rc;
    const cJSON *o = r->json;
    const char *id_key = r->format == KST_FORMAT_PYSERINI ? "id" : "_id";
    rc = json_string(r, o, id_key, 1, &d->id, &d->id_len, err);
    if (rc != KST_OK) return rc;
    char what[32];
    snprintf(what, sizeof what, "\"%s\"", id_key);
    rc = check_id(r, what, d->id, d->id_len, err);
    if (rc != KST_OK) return rc;
    if (r->format == KST_FORMAT_PYSERINI) {
        d->title = "";
        return json_string(r, o, "contents", 1, &d->text, &d->text_len, err);
    }
    rc = json_string(r, o, "text", 1, &d->text, &d->text_len, err);
    if (rc != KST_OK || r->queries) return rc;
    rc = json_string(r, o, "title", 0, &d->title, &d->title_len, err);
    if (rc != KST_OK) return rc;
    const cJSON *meta = cJSON_GetObjectItemCaseSensitive(o, "metadata");
    if (!meta || cJSON_IsNull(meta)) return KST_OK;
    if (!cJSON_IsObject(meta))
        return kst_fail(err, KST_ERR_FORMAT, "%s: line %zu: \"metadata\" must be an object, found %s",
                        name(r), lineno(r), json_type(meta));
    r->meta = cJSON_PrintUnformatted(meta);
    if (!r->meta)
        return kst_fail(err, KST_ERR_NOMEM, "%s: line %zu: out of memory printing \"metadata\"",
                        name(r), lineno(r));
    d->meta_json = r->meta;
    d->meta_len = strlen(r->meta);
    return KST_OK;
}

/* ---------------------------------------------------------------------------------------------
 * Detection and the shared reader
 * ------------------------------------------------------------------------------------------- */

static int detect(kst_docs *r, const char *line, size_t len, kst_error *err) {
    size_t i = 0;
    while (i < len && (line[i] == ' ' || line[i] == '\t')) i++;
    if (i == len || line[i] != '{') {
        r->format = KST_FORMAT_TSV;
        return KST_OK;
    }
    if (r->queries) {
        r->format = KST_FORMAT_BEIR;
        return KST_OK;
    }
    cJSON *o = NULL;
    int rc = parse_object(r, line, len, &o, err);
    if (rc != KST_OK) return rc;
    if (cJSON_GetObjectItemCaseSensitive(o, "_id")) {
        r->format = KST_FORMAT_BEIR;
    } else if (cJSON_GetObjectItemCaseSensitive(o, "id") &&
               cJSON_GetObjectItemCaseSensitive(o, "contents")) {
        r->format = KST_FORMAT_PYSERINI;
    } else {
        rc = kst_fail(err, KST_ERR_FORMAT,
                      "%s: line %zu: a JSON line with neither \"_id\" (BEIR corpus) nor \"id\" and "
                      "\"contents\" (Pyserini); give the format explicitly if it is one of them",
                      name(r), lineno(r));
    }
    cJSON_Delete(o);
    return rc;
}

static int reader_open(const char *path, kst_rec_format format, int queries, kst_docs *r,
                       kst_error *err) {
    r->queries = queries;
    r->format = format;
    int rc = kst_stream_open(path, &r->s, err);
    if (rc != KST_OK || format != KST_FORMAT_AUTO) return rc;
    rc = next_line(r, &r->pending, &r->pending_len, err);
    if (rc != KST_OK || !r->pending) return rc;
    return detect(r, r->pending, r->pending_len, err);
}

static void reader_release_record(kst_docs *r) {
    cJSON_Delete(r->json);
    r->json = NULL;
    cJSON_free(r->meta);
    r->meta = NULL;
}

static int reader_next(kst_docs *r, kst_doc *d, kst_error *err) {
    memset(d, 0, sizeof *d);
    if (r->failure.code != KST_OK) {
        if (err) *err = r->failure;
        return r->failure.code;
    }
    reader_release_record(r);
    const char *line;
    size_t len;
    kst_error local = {0};
    kst_error *e = err ? err : &local;
    int rc = next_line(r, &line, &len, e);
    if (rc == KST_OK && line) {
        rc = r->format == KST_FORMAT_TSV ? parse_tsv(r, line, len, d, e) : parse_json(r, line, len, d, e);
        d->line = lineno(r);
    }
    if (rc != KST_OK) {
        memset(d, 0, sizeof *d);
        reader_release_record(r);
        r->failure = *e;
        r->failure.code = rc;
    }
    return rc;
}

static void reader_release(kst_docs *r) {
    reader_release_record(r);
    kst_stream_close(r->s);
    kst_free(r->copy);
}

/* ---------------------------------------------------------------------------------------------
 * API
 * ------------------------------------------------------------------------------------------- */

const char *kst_rec_format_name(kst_rec_format f) {
    switch (f) {
    case KST_FORMAT_AUTO: return "auto";
    case KST_FORMAT_TSV: return "tsv";
    case KST_FORMAT_BEIR: return "beir";
    case KST_FORMAT_PYSERINI: return "pyserini";
    }
    return "unknown";
}

int kst_rec_format_parse(const char *s, kst_rec_format *out, kst_error *err) {
    static const kst_rec_format all[] = {KST_FORMAT_AUTO, KST_FORMAT_TSV, KST_FORMAT_BEIR,
                                         KST_FORMAT_PYSERINI};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        if (s && strcmp(s, kst_rec_format_name(all[i])) == 0) {
            *out = all[i];
            return KST_OK;
        }
    return kst_fail(err, KST_ERR_INVALID, "unknown format \"%s\" (expected auto, tsv, beir or pyserini)",
                    s ? s : "(null)");
}

int kst_docs_open(const char *path, kst_rec_format format, kst_docs **out, kst_error *err) {
    *out = NULL;
    if ((unsigned)format > KST_FORMAT_PYSERINI)
        return kst_fail(err, KST_ERR_INVALID, "%s: unknown document format %d", path, (int)format);
    kst_docs *r = kst_calloc(1, sizeof *r, "document reader", err);
    if (!r) return KST_ERR_NOMEM;
    int rc = reader_open(path, format, 0, r, err);
    if (rc != KST_OK) {
        reader_release(r);
        kst_free(r);
        return rc;
    }
    *out = r;
    return KST_OK;
}

int kst_docs_next(kst_docs *r, kst_doc *doc, kst_error *err) { return reader_next(r, doc, err); }
kst_rec_format kst_docs_format(const kst_docs *r) { return r->format; }
kst_stream *kst_docs_stream(kst_docs *r) { return r->s; }

void kst_docs_close(kst_docs *r) {
    if (!r) return;
    reader_release(r);
    kst_free(r);
}

int kst_queries_open(const char *path, kst_rec_format format, kst_queries **out, kst_error *err) {
    *out = NULL;
    if (format != KST_FORMAT_AUTO && format != KST_FORMAT_TSV && format != KST_FORMAT_BEIR)
        return kst_fail(err, KST_ERR_INVALID, "%s: queries are TSV or BEIR JSONL, not %s", path,
                        kst_rec_format_name(format));
    kst_queries *q = kst_calloc(1, sizeof *q, "query reader", err);
    if (!q) return KST_ERR_NOMEM;
    int rc = reader_open(path, format, 1, &q->r, err);
    if (rc != KST_OK) {
        reader_release(&q->r);
        kst_free(q);
        return rc;
    }
    *out = q;
    return KST_OK;
}

int kst_queries_next(kst_queries *r, kst_query *q, kst_error *err) {
    kst_doc d;
    int rc = reader_next(&r->r, &d, err);
    q->id = d.id;
    q->id_len = d.id_len;
    q->text = d.text;
    q->text_len = d.text_len;
    q->line = d.line;
    return rc;
}

kst_rec_format kst_queries_format(const kst_queries *r) { return r->r.format; }
kst_stream *kst_queries_stream(kst_queries *r) { return r->r.s; }

void kst_queries_close(kst_queries *r) {
    if (!r) return;
    reader_release(&r->r);
    kst_free(r);
}
