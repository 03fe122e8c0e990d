/* cranfield_bm25.c - indexes Cranfield (title + abstract) in a Kestrel store and writes a BM25
 * top-1000 TREC run for its 225 queries, for `kestrel eval --qrels cranqrel --run FILE`.
 *
 * usage: cranfield_bm25 [--data DIR] [--index DIR] [--run FILE] [-k N]
 *   --data   folder with cran.all.1400 and cran.qry (default $KESTREL_SHARED/cranfield, else
 *            ../shared/data/cranfield)
 *   --index  index folder to create (default: a new folder under /tmp); must not hold an index
 *   --run    run file to write (default build/cranfield_bm25.run); its path is printed
 *
 * Cranfield gotchas (../shared/data/README.md): cran.qry has CRLF line ends, and its `.I`
 * numbers are not the qrels' query ids: cranqrel numbers queries 1..225 by position, so the run
 * uses the position. Documents: `.I id`, then `.T` title, `.A` authors, `.B` source, `.W`
 * abstract; the title and the abstract are indexed (the abstract usually repeats the title). */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/error.h"
#include "core/progress.h"
#include "index/store.h"

/* A growable string. */
typedef struct {
    char *p;
    size_t n, cap;
} buf;

static void buf_add(buf *b, const char *s, size_t n) {
    if (b->n + n + 2 > b->cap) {
        b->cap = (b->n + n + 2) * 2;
        b->p = realloc(b->p, b->cap);
        if (!b->p) {
            fprintf(stderr, "cranfield_bm25: out of memory\n");
            exit(1);
        }
    }
    if (b->n) b->p[b->n++] = ' ';
    memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = '\0';
}

static void buf_clear(buf *b) {
    b->n = 0;
    if (b->p) b->p[0] = '\0';
}

/* Strips "\n" and "\r\n". */
static size_t chomp(char *line, size_t n) {
    while (n && (line[n - 1] == '\n' || line[n - 1] == '\r')) line[--n] = '\0';
    return n;
}

static int fail_err(const char *what, const kst_error *err) {
    fprintf(stderr, "cranfield_bm25: %s: %s\n", what, err->msg);
    return 1;
}

/* Reads `.I` records; calls back with id, title (.T) and text (.W) of each. */
typedef int (*record_fn)(void *ctx, const char *id, const char *title, const char *text);

static int read_records(const char *path, record_fn fn, void *ctx, size_t *count) {
    FILE *fp = fopen(path, "r");
    if (!fp) {
        perror(path);
        return 1;
    }
    char *line = NULL, id[32] = "";
    size_t cap = 0, lineno = 0;
    ssize_t r;
    buf title = {0}, text = {0};
    char field = 0;
    int rc = 0, have = 0;
    *count = 0;
    while ((r = getline(&line, &cap, fp)) >= 0) {
        lineno++;
        size_t n = chomp(line, (size_t)r);
        if (n >= 2 && line[0] == '.' && strchr("ITAWB", line[1]) && (n == 2 || line[2] == ' ')) {
            if (line[1] == 'I') {
                if (have && (rc = fn(ctx, id, title.p ? title.p : "", text.p ? text.p : ""))) break;
                (*count)++;
                if (sscanf(line + 2, "%31s", id) != 1) {
                    fprintf(stderr, "%s:%zu: expected `.I <id>`\n", path, lineno);
                    rc = 1;
                    break;
                }
                have = 1;
                buf_clear(&title);
                buf_clear(&text);
            }
            field = line[1];
            continue;
        }
        if (!have) {
            fprintf(stderr, "%s:%zu: text before the first `.I` record\n", path, lineno);
            rc = 1;
            break;
        }
        if (field == 'T') buf_add(&title, line, n);
        if (field == 'W') buf_add(&text, line, n);
    }
    if (!rc && have) rc = fn(ctx, id, title.p ? title.p : "", text.p ? text.p : "");
    free(line);
    free(title.p);
    free(text.p);
    fclose(fp);
    return rc;
}

typedef struct {
    kst_store *store;
    FILE *run;
    size_t k, qpos, hits;
    kst_progress bar;
} ctx_t;

static int add_doc(void *c, const char *id, const char *title, const char *text) {
    ctx_t *x = c;
    kst_error err = {0};
    if (kst_store_add(x->store, id, title, text, NULL, NULL, NULL, &err) != KST_OK)
        return fail_err("add", &err);
    kst_progress_add(&x->bar, 1);
    return 0;
}

static int run_query(void *c, const char *id, const char *title, const char *text) {
    (void)id;
    (void)title;
    ctx_t *x = c;
    kst_error err = {0};
    kst_store_hits *h = NULL;
    x->qpos++; /* the qrels' query id is the position in cran.qry */
    if (kst_store_bm25(x->store, text, x->k, &h, &err) != KST_OK) return fail_err("bm25", &err);
    char ext[64];
    for (size_t i = 0; i < h->n; i++) {
        if (kst_store_ext_id(x->store, h->hit[i].id, ext, sizeof ext, &err) != KST_OK) {
            kst_store_hits_free(h);
            return fail_err("ext id", &err);
        }
        fprintf(x->run, "%zu Q0 %s %zu %.6f kestrel-bm25\n", x->qpos, ext, i + 1, h->hit[i].score);
    }
    x->hits += h->n;
    kst_store_hits_free(h);
    return 0;
}

int main(int argc, char **argv) {
    const char *data = NULL, *index = NULL, *run = "build/cranfield_bm25.run";
    char data_buf[4096], index_buf[256];
    ctx_t x = {0};
    x.k = 1000;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--data") && i + 1 < argc) data = argv[++i];
        else if (!strcmp(argv[i], "--index") && i + 1 < argc) index = argv[++i];
        else if (!strcmp(argv[i], "--run") && i + 1 < argc) run = argv[++i];
        else if (!strcmp(argv[i], "-k") && i + 1 < argc) x.k = strtoul(argv[++i], NULL, 10);
        else {
            fprintf(stderr, "usage: %s [--data DIR] [--index DIR] [--run FILE] [-k N]\n", argv[0]);
            return 2;
        }
    }
    if (!data) {
        const char *sh = getenv("KESTREL_SHARED");
        snprintf(data_buf, sizeof data_buf, "%s/cranfield", sh && *sh ? sh : "../shared/data");
        data = data_buf;
    }
    if (!index) {
        snprintf(index_buf, sizeof index_buf, "/tmp/kestrel_cranfield_XXXXXX");
        if (!mkdtemp(index_buf)) {
            perror("mkdtemp");
            return 1;
        }
        strncat(index_buf, "/ix", sizeof index_buf - strlen(index_buf) - 1);
        index = index_buf;
    }
    char docs[4200], qry[4200];
    snprintf(docs, sizeof docs, "%s/cran.all.1400", data);
    snprintf(qry, sizeof qry, "%s/cran.qry", data);

    kst_error err = {0};
    if (kst_store_open(index, KST_STORE_CREATE, &x.store, &err) != KST_OK)
        return fail_err("open", &err);
    int64_t existing = 0;
    if (kst_store_count(x.store, &existing, &err) != KST_OK) return fail_err("count", &err);
    if (existing) {
        fprintf(stderr, "cranfield_bm25: %s already holds %lld documents; give a new --index\n",
                index, (long long)existing);
        return 1;
    }
    double t0 = kst_now();
    size_t ndocs = 0, nq = 0;
    kst_progress_begin(&x.bar, "indexing Cranfield", 1400);
    if (kst_store_begin(x.store, &err) != KST_OK) return fail_err("begin", &err);
    if (read_records(docs, add_doc, &x, &ndocs)) return 1;
    if (kst_store_commit(x.store, &err) != KST_OK) return fail_err("commit", &err);
    kst_progress_end(&x.bar);
    double t1 = kst_now();

    x.run = fopen(run, "w");
    if (!x.run) {
        perror(run);
        return 1;
    }
    if (read_records(qry, run_query, &x, &nq)) return 1;
    if (fclose(x.run) != 0) {
        perror(run);
        return 1;
    }
    double t2 = kst_now();
    kst_store_close(x.store);
    if (ndocs != 1400 || nq != 225)
        fprintf(stderr, "cranfield_bm25: warning: expected 1400 documents and 225 queries, read "
                "%zu and %zu\n", ndocs, nq);
    fprintf(stderr, "indexed %zu documents in %.2f s into %s; %zu queries, %zu hits, %.2f s\n",
            ndocs, t1 - t0, index, nq, x.hits, t2 - t1);
    printf("%s\n", run);
    return 0;
}
