/* trec.c - qrels and run readers (TREC, BEIR, Cranfield; plain or gzip) and the run writer. */
#define _POSIX_C_SOURCE 200809L
#include "trec.h"

#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zlib.h>

#include "core/check.h"
#include "core/mem.h"

/* ---------------------------------------------------------------------------------------------
 * String pool: every qid and docid of a file lives in a few large blocks, freed at once.
 * ------------------------------------------------------------------------------------------- */

typedef struct pool_block {
    struct pool_block *next;
    size_t used, cap;
    char data[];
} pool_block;

#define POOL_BLOCK (1u << 20)

static char *pool_add(pool_block **pool, const char *s, size_t n, kst_error *err) {
    pool_block *b = *pool;
    if (!b || b->cap - b->used < n + 1) {
        size_t cap = n + 1 > POOL_BLOCK ? n + 1 : POOL_BLOCK;
        b = kst_malloc(1, sizeof *b + cap, "string pool", err);
        if (!b) return NULL;
        b->next = *pool;
        b->used = 0;
        b->cap = cap;
        *pool = b;
    }
    char *p = b->data + b->used;
    memcpy(p, s, n);
    p[n] = '\0';
    b->used += n + 1;
    return p;
}

static void pool_free(void *pool) {
    for (pool_block *b = pool, *next; b; b = next) {
        next = b->next;
        kst_free(b);
    }
}

/* ---------------------------------------------------------------------------------------------
 * Line reader over zlib (which passes plain files through unchanged)
 * ------------------------------------------------------------------------------------------- */

typedef struct line_reader {
    gzFile gz;
    const char *path;
    char *buf;
    size_t cap;
    size_t lineno;
} line_reader;

static int lr_open(line_reader *lr, const char *path, kst_error *err) {
    memset(lr, 0, sizeof *lr);
    lr->path = path;
    errno = 0;
    lr->gz = gzopen(path, "rb");
    if (!lr->gz)
        return kst_fail(err, errno == ENOENT ? KST_ERR_NOTFOUND : KST_ERR_IO, "%s: cannot open: %s",
                        path, errno ? strerror(errno) : "out of memory");
    lr->cap = 4096;
    lr->buf = kst_malloc(lr->cap, 1, "line buffer", err);
    if (!lr->buf) {
        gzclose(lr->gz);
        lr->gz = NULL;
        return KST_ERR_NOMEM;
    }
    return KST_OK;
}

static void lr_close(line_reader *lr) {
    if (lr->gz) gzclose(lr->gz);
    kst_free(lr->buf);
    memset(lr, 0, sizeof *lr);
}

/* Reads the next line into lr->buf without its "\n" or "\r\n". Returns 1 with *len set, 0 at the
 * end of the file, or a negative status. */
static int lr_next(line_reader *lr, size_t *len, kst_error *err) {
    size_t n = 0;
    for (;;) {
        if (lr->cap - n < 2) {
            if (kst_realloc((void **)&lr->buf, lr->cap * 2, 1, "line buffer", err) != KST_OK)
                return KST_ERR_NOMEM;
            lr->cap *= 2;
        }
        int room = lr->cap - n > (size_t)INT_MAX ? INT_MAX : (int)(lr->cap - n);
        if (!gzgets(lr->gz, lr->buf + n, room)) {
            int zerr;
            const char *msg = gzerror(lr->gz, &zerr);
            if (zerr != Z_OK && zerr != Z_BUF_ERROR)
                return kst_fail(err, KST_ERR_IO, "%s line %zu: read failed: %s", lr->path,
                                lr->lineno + 1, zerr == Z_ERRNO ? strerror(errno) : msg);
            if (zerr == Z_BUF_ERROR)
                return kst_fail(err, KST_ERR_FORMAT, "%s line %zu: the gzip stream is truncated",
                                lr->path, lr->lineno + 1);
            if (n == 0) return 0;
            break; /* last line without "\n" */
        }
        n += strlen(lr->buf + n);
        if (n > 0 && lr->buf[n - 1] == '\n') break;
        if (gzeof(lr->gz)) break;
    }
    lr->lineno++;
    while (n > 0 && (lr->buf[n - 1] == '\n' || lr->buf[n - 1] == '\r')) n--;
    lr->buf[n] = '\0';
    *len = n;
    return 1;
}

/* Splits s in place at runs of whitespace (tabs == 0) or at each tab (tabs == 1). Fills up to
 * max fields and returns how many fields the line has (which may exceed max). */
static int split_fields(char *s, char **f, int max, int tabs) {
    int n = 0;
    if (tabs) {
        for (char *p = s;; p++) {
            if (n < max) f[n] = p;
            n++;
            p = strchr(p, '\t');
            if (!p) break;
            *p = '\0';
        }
        return n;
    }
    char *p = s;
    for (;;) {
        while (*p && isspace((unsigned char)*p)) p++;
        if (!*p) break;
        if (n < max) f[n] = p;
        n++;
        while (*p && !isspace((unsigned char)*p)) p++;
        if (!*p) break;
        *p++ = '\0';
    }
    return n;
}

static int blank_or_comment(const char *s) {
    while (*s && isspace((unsigned char)*s)) s++;
    return *s == '\0' || *s == '#';
}

/* Parses a whole string as a decimal int. */
static int parse_int(const char *s, int *out) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (end == s || *end || errno || v < -2147483647L || v > 2147483647L) return 0;
    *out = (int)v;
    return 1;
}

/* Parses a whole string as a finite double (trec_eval reads scores with atof). */
static int parse_score(const char *s, double *out) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (end == s || *end || !isfinite(v)) return 0;
    *out = v;
    return 1;
}

/* ---------------------------------------------------------------------------------------------
 * Entries: one per line, sorted and grouped by query at the end
 * ------------------------------------------------------------------------------------------- */

typedef struct entry {
    const char *qid, *docid;
    double score; /* run score, or qrels relevance */
    size_t line;
} entry;

typedef struct entries {
    entry *v;
    size_t n, cap;
    pool_block *pool;
    const char *last_qid; /* runs repeat a qid on consecutive lines: store it once */
} entries;

static int entries_add(entries *e, const char *qid, const char *docid, double score, size_t line,
                       kst_error *err) {
    if (e->n == e->cap) {
        size_t cap = e->cap ? e->cap * 2 : 1024;
        if (kst_realloc((void **)&e->v, cap, sizeof *e->v, "file entries", err) != KST_OK)
            return KST_ERR_NOMEM;
        e->cap = cap;
    }
    const char *q = e->last_qid;
    if (!q || strcmp(q, qid) != 0) {
        q = pool_add(&e->pool, qid, strlen(qid), err);
        if (!q) return KST_ERR_NOMEM;
        e->last_qid = q;
    }
    const char *d = pool_add(&e->pool, docid, strlen(docid), err);
    if (!d) return KST_ERR_NOMEM;
    e->v[e->n++] = (entry){q, d, score, line};
    return KST_OK;
}

static int cmp_qid_docid(const void *a, const void *b) {
    const entry *x = a, *y = b;
    int c = strcmp(x->qid, y->qid);
    return c ? c : strcmp(x->docid, y->docid);
}

/* trec_eval's ranking (comp_sim_docno in form_res_rels.c): score descending, then docid
 * descending. Within one query the docids are distinct, so this is a total order. */
static int cmp_qid_rank(const void *a, const void *b) {
    const entry *x = a, *y = b;
    int c = strcmp(x->qid, y->qid);
    if (c) return c;
    if (x->score > y->score) return -1;
    if (x->score < y->score) return 1;
    return strcmp(y->docid, x->docid);
}

/* Sorts by (qid, docid) and refuses a repeated pair, naming both lines. */
static int check_duplicates(entries *e, const char *path, const char *what, kst_error *err) {
    qsort(e->v, e->n, sizeof *e->v, cmp_qid_docid);
    for (size_t i = 1; i < e->n; i++) {
        const entry *a = &e->v[i - 1], *b = &e->v[i];
        if (strcmp(a->qid, b->qid) == 0 && strcmp(a->docid, b->docid) == 0) {
            size_t first = a->line < b->line ? a->line : b->line;
            size_t second = a->line < b->line ? b->line : a->line;
            return kst_fail(err, KST_ERR_FORMAT,
                            "%s line %zu: document \"%s\" appears twice for query \"%s\" (first at "
                            "line %zu); %s must list each (qid, docid) once (trec_eval also stops "
                            "at duplicate docs)",
                            path, second, b->docid, b->qid, first, what);
        }
    }
    return KST_OK;
}

/* Builds the query list of sorted entries: qids[k] and the first entry off[k] of each query. */
static int group_queries(const entries *e, char ***qids, size_t **off, size_t *nq, kst_error *err) {
    /* Equal qids may be distinct copies (a file that interleaves queries): compare the text. */
    size_t k = 0;
    for (size_t i = 0; i < e->n; i++)
        if (i == 0 || strcmp(e->v[i].qid, e->v[i - 1].qid) != 0) k++;
    *qids = kst_malloc(k, sizeof **qids, "query ids", err);
    *off = kst_malloc(k + 1, sizeof **off, "query offsets", err);
    if (!*qids || !*off) return KST_ERR_NOMEM;
    k = 0;
    for (size_t i = 0; i < e->n; i++)
        if (i == 0 || strcmp(e->v[i].qid, e->v[i - 1].qid) != 0) {
            (*qids)[k] = (char *)e->v[i].qid;
            (*off)[k++] = i;
        }
    (*off)[k] = e->n;
    *nq = k;
    return KST_OK;
}

static long find_qid(char *const *qids, size_t nq, const char *qid) {
    size_t lo = 0, hi = nq;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = strcmp(qids[mid], qid);
        if (c == 0) return (long)mid;
        if (c < 0) lo = mid + 1;
        else hi = mid;
    }
    return -1;
}

/* ---------------------------------------------------------------------------------------------
 * Qrels
 * ------------------------------------------------------------------------------------------- */

static int is_beir_header(char *line) {
    char copy[64];
    size_t n = strlen(line);
    if (n >= sizeof copy) return 0;
    memcpy(copy, line, n + 1);
    char *f[4];
    return split_fields(copy, f, 4, 1) == 3 && strcmp(f[0], "query-id") == 0 &&
           strcmp(f[1], "corpus-id") == 0 && strcmp(f[2], "score") == 0;
}

/* Cranfield ids are positive integers; print them without leading zeros so "001" and "1" meet. */
static int cranfield_id(const char *s, char *buf, size_t cap) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (end == s || *end || errno || v <= 0) return 0;
    snprintf(buf, cap, "%ld", v);
    return 1;
}

static int parse_qrels_line(line_reader *lr, kst_qrels_format fmt, entries *e, kst_error *err) {
    char *f[4];
    const char *path = lr->path;
    size_t ln = lr->lineno;
    int rel;
    if (fmt == KST_QRELS_BEIR) {
        int n = split_fields(lr->buf, f, 4, 1);
        if (n != 3)
            return kst_fail(err, KST_ERR_FORMAT,
                            "%s line %zu: expected 3 tab-separated fields (query-id corpus-id "
                            "score), found %d",
                            path, ln, n);
        if (!*f[0] || !*f[1])
            return kst_fail(err, KST_ERR_FORMAT, "%s line %zu: empty %s", path, ln,
                            *f[0] ? "corpus-id" : "query-id");
        if (!parse_int(f[2], &rel))
            return kst_fail(err, KST_ERR_FORMAT,
                            "%s line %zu: expected an integer relevance score, found \"%s\"", path,
                            ln, f[2]);
        return entries_add(e, f[0], f[1], rel, ln, err);
    }
    if (fmt == KST_QRELS_CRANFIELD) {
        int n = split_fields(lr->buf, f, 4, 0);
        if (n != 3)
            return kst_fail(err, KST_ERR_FORMAT,
                            "%s line %zu: expected 3 fields (qid docid code) of Cranfield's "
                            "cranqrel, found %d",
                            path, ln, n);
        char qid[32], docid[32];
        if (!cranfield_id(f[0], qid, sizeof qid) || !cranfield_id(f[1], docid, sizeof docid))
            return kst_fail(err, KST_ERR_FORMAT,
                            "%s line %zu: expected positive integer query and document numbers, "
                            "found \"%s\" \"%s\"",
                            path, ln, f[0], f[1]);
        int code;
        if (!parse_int(f[2], &code) || !((code >= 1 && code <= 4) || code == -1))
            return kst_fail(err, KST_ERR_FORMAT,
                            "%s line %zu: expected a relevance code 1..4 or -1, found \"%s\"", path,
                            ln, f[2]);
        return entries_add(e, qid, docid, code == -1 ? 0 : 5 - code, ln, err);
    }
    int n = split_fields(lr->buf, f, 4, 0);
    if (n != 4)
        return kst_fail(err, KST_ERR_FORMAT,
                        "%s line %zu: expected 4 fields (qid iter docid rel), found %d%s", path,
                        ln, n,
                        n == 3 ? " (BEIR qrels start with the header query-id<TAB>corpus-id<TAB>"
                                 "score; Cranfield's cranqrel needs the cranfield format)"
                               : "");
    if (!parse_int(f[3], &rel))
        return kst_fail(err, KST_ERR_FORMAT,
                        "%s line %zu: expected an integer relevance, found \"%s\"", path, ln, f[3]);
    return entries_add(e, f[0], f[2], rel, ln, err);
}

int kst_qrels_read(const char *path, kst_qrels_format format, kst_qrels **out, kst_error *err) {
    *out = NULL;
    line_reader lr;
    entries e = {0};
    kst_qrels *q = NULL;
    int rc = lr_open(&lr, path, err);
    if (rc != KST_OK) return rc;
    size_t len;
    int r, first_seen = 0;
    while ((r = lr_next(&lr, &len, err)) > 0) {
        if (blank_or_comment(lr.buf)) continue;
        if (!first_seen && (format == KST_QRELS_AUTO || format == KST_QRELS_BEIR)) {
            /* The first content line decides: BEIR's header, or (auto only) TREC. */
            first_seen = 1;
            int header = is_beir_header(lr.buf);
            if (format == KST_QRELS_AUTO) format = header ? KST_QRELS_BEIR : KST_QRELS_TREC;
            else if (!header) {
                rc = kst_fail(err, KST_ERR_FORMAT,
                              "%s line %zu: expected the BEIR header "
                              "query-id<TAB>corpus-id<TAB>score",
                              path, lr.lineno);
                goto done;
            }
            if (header) continue;
        }
        KST_TRY(parse_qrels_line(&lr, format, &e, err));
    }
    if (r < 0) {
        rc = r;
        goto done;
    }
    if (e.n == 0) {
        rc = kst_fail(err, KST_ERR_FORMAT, "%s: no judgments found", path);
        goto done;
    }
    KST_TRY(check_duplicates(&e, path, "qrels", err));
    q = kst_calloc(1, sizeof *q, "qrels", err);
    if (!q) {
        rc = KST_ERR_NOMEM;
        goto done;
    }
    q->n = e.n;
    q->pool = e.pool;
    e.pool = NULL;
    q->docids = kst_malloc(e.n, sizeof *q->docids, "qrels docids", err);
    q->rel = kst_malloc(e.n, sizeof *q->rel, "qrels relevance", err);
    if (!q->docids || !q->rel) {
        rc = KST_ERR_NOMEM;
        goto done;
    }
    for (size_t i = 0; i < e.n; i++) {
        q->docids[i] = (char *)e.v[i].docid;
        q->rel[i] = (int)e.v[i].score;
    }
    KST_TRY(group_queries(&e, &q->qids, &q->off, &q->nq, err));
    *out = q;
    q = NULL;
done:
    kst_qrels_free(q);
    pool_free(e.pool);
    kst_free(e.v);
    lr_close(&lr);
    return rc;
}

int kst_qrels_read_cranfield(const char *path, kst_qrels **out, kst_error *err) {
    return kst_qrels_read(path, KST_QRELS_CRANFIELD, out, err);
}

long kst_qrels_find(const kst_qrels *q, const char *qid) { return find_qid(q->qids, q->nq, qid); }

void kst_qrels_free(kst_qrels *q) {
    if (!q) return;
    pool_free(q->pool);
    kst_free(q->qids);
    kst_free(q->off);
    kst_free(q->docids);
    kst_free(q->rel);
    kst_free(q);
}

/* Opens `path`.tmp.PID for writing; fills *tmp (free with kst_free). */
static FILE *open_tmp(const char *path, char **tmp, kst_error *err) {
    size_t n = strlen(path) + 32;
    *tmp = kst_malloc(n, 1, "temporary path", err);
    if (!*tmp) return NULL;
    snprintf(*tmp, n, "%s.tmp.%ld", path, (long)getpid());
    FILE *fp = fopen(*tmp, "wb");
    if (!fp) kst_fail(err, KST_ERR_IO, "%s: cannot create: %s", *tmp, strerror(errno));
    return fp;
}

/* Closes fp (after fsync) and renames tmp over path; on any failure removes tmp. */
static int close_and_rename(FILE *fp, const char *tmp, const char *path, int rc, kst_error *err) {
    if (rc == KST_OK && (fflush(fp) != 0 || ferror(fp) || fsync(fileno(fp)) != 0))
        rc = kst_fail(err, KST_ERR_IO, "%s: write failed: %s", tmp, strerror(errno));
    if (fclose(fp) != 0 && rc == KST_OK)
        rc = kst_fail(err, KST_ERR_IO, "%s: cannot close: %s", tmp, strerror(errno));
    if (rc == KST_OK && rename(tmp, path) != 0)
        rc = kst_fail(err, KST_ERR_IO, "%s: cannot rename into place: %s", path, strerror(errno));
    if (rc != KST_OK) unlink(tmp);
    return rc;
}

int kst_qrels_write(const kst_qrels *q, const char *path, kst_error *err) {
    char *tmp = NULL;
    FILE *fp = open_tmp(path, &tmp, err);
    if (!fp) {
        kst_free(tmp);
        return tmp ? KST_ERR_IO : KST_ERR_NOMEM;
    }
    for (size_t k = 0; k < q->nq; k++)
        for (size_t j = q->off[k]; j < q->off[k + 1]; j++)
            fprintf(fp, "%s 0 %s %d\n", q->qids[k], q->docids[j], q->rel[j]);
    int rc = close_and_rename(fp, tmp, path, KST_OK, err);
    kst_free(tmp);
    return rc;
}

/* ---------------------------------------------------------------------------------------------
 * Runs
 * ------------------------------------------------------------------------------------------- */

int kst_run_read(const char *path, kst_run **out, kst_error *err) {
    *out = NULL;
    line_reader lr;
    entries e = {0};
    kst_run *run = NULL;
    char *tag = NULL;
    int rc = lr_open(&lr, path, err);
    if (rc != KST_OK) return rc;
    size_t len;
    int r;
    while ((r = lr_next(&lr, &len, err)) > 0) {
        if (blank_or_comment(lr.buf)) continue;
        char *f[6];
        int n = split_fields(lr.buf, f, 6, 0);
        if (n < 6) {
            rc = kst_fail(err, KST_ERR_FORMAT,
                          "%s line %zu: expected 6 fields (qid Q0 docid rank score tag), found %d",
                          path, lr.lineno, n);
            goto done;
        }
        double score;
        if (!parse_score(f[4], &score)) {
            rc = kst_fail(err, KST_ERR_FORMAT,
                          "%s line %zu: expected a finite number as the score (field 5 of qid Q0 "
                          "docid rank score tag), found \"%s\"",
                          path, lr.lineno, f[4]);
            goto done;
        }
        KST_TRY(entries_add(&e, f[0], f[2], score, lr.lineno, err));
        if (!tag || strcmp(tag, f[5]) != 0) {
            char *t = pool_add(&e.pool, f[5], strlen(f[5]), err);
            if (!t) {
                rc = KST_ERR_NOMEM;
                goto done;
            }
            tag = t;
        }
    }
    if (r < 0) {
        rc = r;
        goto done;
    }
    if (e.n == 0) {
        rc = kst_fail(err, KST_ERR_FORMAT, "%s: no results found", path);
        goto done;
    }
    KST_TRY(check_duplicates(&e, path, "a run", err));
    qsort(e.v, e.n, sizeof *e.v, cmp_qid_rank);
    run = kst_calloc(1, sizeof *run, "run", err);
    if (!run) {
        rc = KST_ERR_NOMEM;
        goto done;
    }
    run->n = e.n;
    run->tag = tag;
    run->pool = e.pool;
    e.pool = NULL;
    run->docids = kst_malloc(e.n, sizeof *run->docids, "run docids", err);
    run->scores = kst_malloc(e.n, sizeof *run->scores, "run scores", err);
    if (!run->docids || !run->scores) {
        rc = KST_ERR_NOMEM;
        goto done;
    }
    for (size_t i = 0; i < e.n; i++) {
        run->docids[i] = (char *)e.v[i].docid;
        run->scores[i] = e.v[i].score;
    }
    KST_TRY(group_queries(&e, &run->qids, &run->off, &run->nq, err));
    *out = run;
    run = NULL;
done:
    kst_run_free(run);
    pool_free(e.pool);
    kst_free(e.v);
    lr_close(&lr);
    return rc;
}

long kst_run_find(const kst_run *r, const char *qid) { return find_qid(r->qids, r->nq, qid); }

void kst_run_free(kst_run *r) {
    if (!r) return;
    pool_free(r->pool);
    kst_free(r->qids);
    kst_free(r->off);
    kst_free(r->docids);
    kst_free(r->scores);
    kst_free(r);
}

/* ---------------------------------------------------------------------------------------------
 * Run writer
 * ------------------------------------------------------------------------------------------- */

static int is_token(const char *s) {
    if (!s || !*s) return 0;
    for (; *s; s++)
        if (isspace((unsigned char)*s)) return 0;
    return 1;
}

/* The shortest of %.15g / %.17g that reads back as v, so a re-read run ranks exactly as written
 * (%.6f would turn close scores into ties that trec_eval breaks by docid). */
static void format_score(char *buf, size_t cap, double v) {
    snprintf(buf, cap, "%.15g", v);
    if (strtod(buf, NULL) != v) snprintf(buf, cap, "%.17g", v);
}

int kst_run_writer_open(kst_run_writer *w, const char *path, const char *tag, kst_error *err) {
    memset(w, 0, sizeof *w);
    if (!is_token(tag))
        return kst_fail(err, KST_ERR_INVALID, "run tag \"%s\": expected a non-empty word without "
                        "whitespace", tag ? tag : "(null)");
    w->path = kst_strndup(path, (size_t)-1, err);
    w->tag = kst_strndup(tag, (size_t)-1, err);
    if (!w->path || !w->tag) {
        kst_run_writer_abort(w);
        return KST_ERR_NOMEM;
    }
    w->fp = open_tmp(path, &w->tmp, err);
    if (!w->fp) {
        int rc = w->tmp ? KST_ERR_IO : KST_ERR_NOMEM;
        kst_run_writer_abort(w);
        return rc;
    }
    return KST_OK;
}

int kst_run_writer_add(kst_run_writer *w, const char *qid, const char *const *docids,
                       const double *scores, size_t n, kst_error *err) {
    if (!w->fp) return kst_fail(err, KST_ERR_MISUSE, "run writer is not open");
    if (!is_token(qid))
        return kst_fail(err, KST_ERR_INVALID,
                        "query id \"%s\": expected a non-empty word without whitespace",
                        qid ? qid : "(null)");
    for (size_t i = 0; i < n; i++) {
        if (!is_token(docids[i]))
            return kst_fail(err, KST_ERR_INVALID,
                            "query %s, rank %zu: document id \"%s\": expected a non-empty word "
                            "without whitespace",
                            qid, i + 1, docids[i] ? docids[i] : "(null)");
        if (!isfinite(scores[i]))
            return kst_fail(err, KST_ERR_INVALID, "query %s, rank %zu: score is not finite", qid,
                            i + 1);
        if (i > 0 && scores[i] > scores[i - 1])
            return kst_fail(err, KST_ERR_INVALID,
                            "query %s, rank %zu: score %g is above the score %g at rank %zu; "
                            "trec_eval ranks by score, so hits must come in non-increasing score "
                            "order",
                            qid, i + 1, scores[i], scores[i - 1], i);
    }
    FILE *fp = w->fp;
    char s[40];
    for (size_t i = 0; i < n; i++) {
        format_score(s, sizeof s, scores[i]);
        if (fprintf(fp, "%s Q0 %s %zu %s %s\n", qid, docids[i], i + 1, s, w->tag) < 0)
            return kst_fail(err, KST_ERR_IO, "%s: write failed: %s", w->tmp, strerror(errno));
    }
    w->lines += n;
    return KST_OK;
}

int kst_run_writer_finish(kst_run_writer *w, kst_error *err) {
    if (!w->fp) return kst_fail(err, KST_ERR_MISUSE, "run writer is not open");
    int rc = close_and_rename(w->fp, w->tmp, w->path, KST_OK, err);
    w->fp = NULL;
    kst_run_writer_abort(w);
    return rc;
}

void kst_run_writer_abort(kst_run_writer *w) {
    if (w->fp) {
        fclose(w->fp);
        unlink(w->tmp);
    }
    kst_free(w->tmp);
    kst_free(w->path);
    kst_free(w->tag);
    memset(w, 0, sizeof *w);
}
