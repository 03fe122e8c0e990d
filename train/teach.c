/* teach.c - score (query, positive, negative) triples with a local or remote cross-encoder into a
 * teacher file. */
#include "teach.h"

#include <curl/curl.h>
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "core/check.h"
#include "core/json.h"
#include "core/mem.h"
#include "core/ops.h"
#include "core/progress.h"
#include "core/stream.h"
#include "encoders/encoder.h"
#include "train/teacher.h"

kst_teach_opts kst_teach_opts_default(void) {
    kst_teach_opts o;
    memset(&o, 0, sizeof o);
    o.batch_size = 32;
    o.chunk = 2048;
    o.timeout_s = 120;
    o.connect_timeout_s = 10;
    o.retries = 5;
    o.retry_wait_s = 0.5;
    return o;
}

/* ------------------------------------------------------------------------------------------ */
/* the /rerank client */

struct kst_rerank_client {
    CURL *easy;
    struct curl_slist *headers;
    char *url;
    char curl_msg[CURL_ERROR_SIZE];
    char *body;   /* the answer being received */
    size_t len, cap;
    int too_big;
    int retries;
    double wait;
    size_t n_requests, n_retries;
};

#define MAX_ANSWER ((size_t)64 << 20)

static pthread_once_t curl_once = PTHREAD_ONCE_INIT;
static CURLcode curl_init_rc = CURLE_OK;
static void curl_setup(void) { curl_init_rc = curl_global_init(CURL_GLOBAL_DEFAULT); }

static size_t on_body(char *data, size_t size, size_t nmemb, void *ud) {
    kst_rerank_client *c = ud;
    size_t n = size * nmemb;
    if (c->len + n + 1 > MAX_ANSWER) {
        c->too_big = 1;
        return 0; /* aborts the transfer */
    }
    if (c->len + n + 1 > c->cap) {
        size_t nc = c->cap ? c->cap : 4096;
        while (nc < c->len + n + 1) nc *= 2;
        char *b = realloc(c->body, nc);
        if (!b) return 0;
        c->body = b, c->cap = nc;
    }
    memcpy(c->body + c->len, data, n);
    c->len += n;
    c->body[c->len] = '\0';
    return n;
}

int kst_rerank_client_open(const char *url, const kst_teach_opts *o, kst_rerank_client **out,
                           kst_error *err) {
    *out = NULL;
    if (strncmp(url, "http://", 7) != 0 && strncmp(url, "https://", 8) != 0)
        return kst_fail(err, KST_ERR_INVALID, "%s: the teacher URL must start with http:// or https://", url);
    pthread_once(&curl_once, curl_setup);
    if (curl_init_rc != CURLE_OK)
        return kst_fail(err, KST_ERR_IO, "libcurl: %s", curl_easy_strerror(curl_init_rc));
    kst_rerank_client *c = kst_calloc(1, sizeof *c, "HTTP client", err);
    if (!c) return KST_ERR_NOMEM;
    size_t ul = strlen(url);
    while (ul > 0 && url[ul - 1] == '/') ul--;
    int has = ul >= 7 && memcmp(url + ul - 7, "/rerank", 7) == 0;
    c->url = kst_malloc(ul + 8, 1, "URL", err);
    if (!c->url) {
        kst_free(c);
        return KST_ERR_NOMEM;
    }
    snprintf(c->url, ul + 8, "%.*s%s", (int)ul, url, has ? "" : "/rerank");
    c->retries = o->retries;
    c->wait = o->retry_wait_s;
    c->easy = curl_easy_init();
    c->headers = curl_slist_append(NULL, "Content-Type: application/json");
    if (!c->easy || !c->headers) {
        kst_rerank_client_close(c);
        return kst_fail(err, KST_ERR_NOMEM, "libcurl: cannot make a handle");
    }
    CURL *e = c->easy;
    int bad = 0;
    bad |= curl_easy_setopt(e, CURLOPT_URL, c->url) != CURLE_OK;
    bad |= curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "http,https") != CURLE_OK;
    bad |= curl_easy_setopt(e, CURLOPT_HTTPHEADER, c->headers) != CURLE_OK;
    bad |= curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, (long)(o->timeout_s * 1000)) != CURLE_OK;
    bad |= curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, (long)(o->connect_timeout_s * 1000)) != CURLE_OK;
    bad |= curl_easy_setopt(e, CURLOPT_USERAGENT, "kestrel") != CURLE_OK;
    bad |= curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L) != CURLE_OK;
    bad |= curl_easy_setopt(e, CURLOPT_TCP_KEEPALIVE, 1L) != CURLE_OK;
    bad |= curl_easy_setopt(e, CURLOPT_ERRORBUFFER, c->curl_msg) != CURLE_OK;
    bad |= curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, on_body) != CURLE_OK;
    bad |= curl_easy_setopt(e, CURLOPT_WRITEDATA, c) != CURLE_OK;
    if (bad) {
        kst_rerank_client_close(c);
        return kst_fail(err, KST_ERR_IO, "%s: libcurl refused an option", url);
    }
    *out = c;
    return KST_OK;
}

void kst_rerank_client_close(kst_rerank_client *c) {
    if (!c) return;
    if (c->easy) curl_easy_cleanup(c->easy);
    curl_slist_free_all(c->headers);
    free(c->body);
    kst_free(c->url);
    kst_free(c);
}

void kst_rerank_client_counts(const kst_rerank_client *c, size_t *requests, size_t *retries) {
    *requests = c->n_requests;
    *retries = c->n_retries;
}

/* Builds the request body: {"query": ..., "texts": [...], "raw_scores": true, "truncate": true}. */
static char *request_json(const char *q, size_t ql, const char *const *t, const size_t *tl, size_t n,
                          kst_error *err) {
    cJSON *j = cJSON_CreateObject(), *arr = NULL;
    char *s = NULL, *tmp = NULL;
    if (!j) goto oom;
    if (!(tmp = kst_strndup(q, ql, err))) goto fail;
    if (!cJSON_AddStringToObject(j, "query", tmp)) goto oom;
    kst_free(tmp), tmp = NULL;
    if (!(arr = cJSON_AddArrayToObject(j, "texts"))) goto oom;
    for (size_t i = 0; i < n; i++) {
        if (!(tmp = kst_strndup(t[i], tl[i], err))) goto fail;
        cJSON *str = cJSON_CreateString(tmp);
        kst_free(tmp), tmp = NULL;
        if (!str) goto oom;
        cJSON_AddItemToArray(arr, str);
    }
    if (!cJSON_AddTrueToObject(j, "raw_scores") || !cJSON_AddTrueToObject(j, "truncate")) goto oom;
    s = cJSON_PrintUnformatted(j);
    if (!s) goto oom;
    cJSON_Delete(j);
    return s;
oom:
    kst_fail(err, KST_ERR_NOMEM, "out of memory building a /rerank request");
fail:
    kst_free(tmp);
    cJSON_Delete(j);
    return NULL;
}

/* The first bytes of the answer, printable, for messages. */
static const char *snippet(const kst_rerank_client *c, char *buf, size_t cap) {
    size_t n = c->len < cap - 4 ? c->len : cap - 4, k = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)c->body[i];
        buf[k++] = ch >= 32 && ch < 127 ? (char)ch : '.';
    }
    if (c->len > n) buf[k++] = '.', buf[k++] = '.', buf[k++] = '.';
    buf[k] = '\0';
    return c->len ? buf : "(empty)";
}

/* Reads [{"index": i, "score": s}, ...] for n texts into out. */
static int parse_answer(kst_rerank_client *c, size_t n, float *out, kst_error *err) {
    char snip[160];
    const char *want = "expected the /rerank answer [{\"index\": i, \"score\": s}, ...]";
    cJSON *j = cJSON_ParseWithLength(c->body ? c->body : "", c->len);
    int rc = KST_OK;
    unsigned char *seen = NULL;
    if (!j || !cJSON_IsArray(j)) {
        rc = kst_fail(err, KST_ERR_FORMAT, "%s: the answer is not a JSON array (%s): %s", c->url, want,
                      snippet(c, snip, sizeof snip));
        goto done;
    }
    size_t got = (size_t)cJSON_GetArraySize(j);
    if (got != n) {
        rc = kst_fail(err, KST_ERR_FORMAT, "%s: the answer has %zu entries for %zu texts (%s)", c->url, got, n, want);
        goto done;
    }
    seen = kst_calloc(n ? n : 1, 1, "answer", err);
    if (!seen) {
        rc = KST_ERR_NOMEM;
        goto done;
    }
    size_t k = 0;
    const cJSON *it;
    cJSON_ArrayForEach(it, j) {
        const cJSON *ix = cJSON_GetObjectItemCaseSensitive(it, "index");
        const cJSON *sc = cJSON_GetObjectItemCaseSensitive(it, "score");
        if (!cJSON_IsNumber(ix) || !cJSON_IsNumber(sc)) {
            rc = kst_fail(err, KST_ERR_FORMAT, "%s: entry %zu lacks a numeric \"index\" or \"score\" (%s): %s", c->url,
                          k, want, snippet(c, snip, sizeof snip));
            goto done;
        }
        double d = ix->valuedouble;
        if (!(d >= 0 && d < (double)n) || d != floor(d) || seen[(size_t)d]) {
            rc = kst_fail(err, KST_ERR_FORMAT, "%s: entry %zu has index %g: expected each of 0..%zu once", c->url, k, d,
                          n - 1);
            goto done;
        }
        if (!isfinite(sc->valuedouble) || fabs(sc->valuedouble) > 3.4e38) {
            rc = kst_fail(err, KST_ERR_FORMAT, "%s: entry %zu has a score that is not a finite float", c->url, k);
            goto done;
        }
        seen[(size_t)d] = 1;
        out[(size_t)d] = (float)sc->valuedouble;
        k++;
    }
done:
    kst_free(seen);
    cJSON_Delete(j);
    return rc;
}

static int retryable_curl(CURLcode cr) {
    return cr == CURLE_COULDNT_CONNECT || cr == CURLE_OPERATION_TIMEDOUT || cr == CURLE_RECV_ERROR ||
           cr == CURLE_SEND_ERROR || cr == CURLE_GOT_NOTHING || cr == CURLE_PARTIAL_FILE;
}

static void sleep_s(double s) {
    struct timespec ts = {(time_t)s, (long)((s - floor(s)) * 1e9)};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {}
}

int kst_rerank_score(kst_rerank_client *c, const char *query, size_t qlen,
                     const char *const *texts, const size_t *lens, size_t n, float *out,
                     kst_error *err) {
    char *req = request_json(query, qlen, texts, lens, n, err);
    if (!req) return KST_ERR_NOMEM;
    int rc = KST_OK;
    double wait = c->wait;
    curl_easy_setopt(c->easy, CURLOPT_POSTFIELDS, req);
    curl_easy_setopt(c->easy, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)strlen(req));
    for (int attempt = 0;; attempt++) {
        c->len = 0, c->too_big = 0, c->curl_msg[0] = '\0';
        c->n_requests++;
        CURLcode cr = curl_easy_perform(c->easy);
        long status = 0;
        if (cr == CURLE_OK) curl_easy_getinfo(c->easy, CURLINFO_RESPONSE_CODE, &status);
        int again = (cr != CURLE_OK && retryable_curl(cr)) || status >= 500 || status == 429;
        if (again && attempt < c->retries) {
            c->n_retries++;
            sleep_s(wait);
            wait = wait * 2 > 30 ? 30 : wait * 2;
            continue;
        }
        char snip[160];
        if (cr != CURLE_OK) {
            if (c->too_big)
                rc = kst_fail(err, KST_ERR_FORMAT, "%s: the answer exceeds %zu MiB", c->url, MAX_ANSWER >> 20);
            else
                rc = kst_fail(err, KST_ERR_IO, "%s: %s%s", c->url, c->curl_msg[0] ? c->curl_msg : curl_easy_strerror(cr),
                              attempt ? " (after retries; is the server up?)" : "");
        } else if (status != 200) {
            rc = kst_fail(err, KST_ERR_IO, "%s: HTTP %ld%s: %s", c->url, status, attempt ? " after retries" : "",
                          snippet(c, snip, sizeof snip));
        } else {
            rc = parse_answer(c, n, out, err);
        }
        break;
    }
    cJSON_free(req);
    return rc;
}

/* ------------------------------------------------------------------------------------------ */
/* triples */

/* One chunk of triples: fields point into `text` (the chunk's copy of its lines). */
typedef struct chunk {
    char *text;
    size_t used, cap;
    size_t n, capn;
    size_t *off;      /* (n, 3) field offsets into text */
    size_t *flen;     /* (n, 3) field lengths */
    const char **q, **p; /* resolved texts (n), (2n): pos, neg */
    size_t *ql, *pl;
    float *score;     /* (2n) */
    size_t *order;    /* (n) grouped by query */
    size_t *line;     /* (n) input line of each triple */
} chunk;

static void chunk_free(chunk *c) {
    kst_free(c->text), kst_free(c->off), kst_free(c->flen), kst_free(c->q), kst_free(c->p);
    kst_free(c->ql), kst_free(c->pl), kst_free(c->score), kst_free(c->order), kst_free(c->line);
}

static int chunk_add(chunk *c, const char *line, size_t len, const char *path, size_t lineno,
                     const kst_textmap *qmap, const kst_textmap *cmap, kst_error *err) {
    int rc = KST_OK;
    if (c->n == c->capn) {
        size_t nc = c->capn ? 2 * c->capn : 256;
        KST_TRY(kst_realloc((void **)&c->off, nc * 3, sizeof *c->off, "triples", err));
        KST_TRY(kst_realloc((void **)&c->flen, nc * 3, sizeof *c->flen, "triples", err));
        KST_TRY(kst_realloc((void **)&c->q, nc, sizeof *c->q, "triples", err));
        KST_TRY(kst_realloc((void **)&c->ql, nc, sizeof *c->ql, "triples", err));
        KST_TRY(kst_realloc((void **)&c->p, nc * 2, sizeof *c->p, "triples", err));
        KST_TRY(kst_realloc((void **)&c->pl, nc * 2, sizeof *c->pl, "triples", err));
        KST_TRY(kst_realloc((void **)&c->score, nc * 2, sizeof *c->score, "triples", err));
        KST_TRY(kst_realloc((void **)&c->order, nc, sizeof *c->order, "triples", err));
        KST_TRY(kst_realloc((void **)&c->line, nc, sizeof *c->line, "triples", err));
        c->capn = nc;
    }
    if (c->used + len + 1 > c->cap) {
        size_t nc = c->cap ? 2 * c->cap : (1u << 20);
        while (nc < c->used + len + 1) nc *= 2;
        KST_TRY(kst_realloc((void **)&c->text, nc, 1, "triples", err));
        c->cap = nc;
    }
    memcpy(c->text + c->used, line, len);
    c->text[c->used + len] = '\0';
    size_t k = 0, s = 0;
    const char *what = qmap ? "qid<TAB>pos_pid<TAB>neg_pid" : "query<TAB>positive<TAB>negative";
    for (size_t i = 0; i <= len; i++) {
        if (i == len || line[i] == '\t') {
            if (k < 3) {
                c->off[c->n * 3 + k] = c->used + s;
                c->flen[c->n * 3 + k] = i - s;
            }
            k++;
            s = i + 1;
        }
    }
    if (k != 3)
        return kst_fail(err, KST_ERR_FORMAT, "%s line %zu: %zu column%s, expected 3 (%s)", path, lineno, k,
                        k == 1 ? "" : "s", what);
    for (size_t f = 0; f < 3; f++) {
        if (c->flen[c->n * 3 + f] == 0)
            return kst_fail(err, KST_ERR_FORMAT, "%s line %zu: column %zu is empty (%s)", path, lineno, f + 1, what);
    }
    c->line[c->n] = lineno;
    c->used += len + 1;
    return KST_OK;
done:
    return rc;
}

/* Points q/p at the texts of every triple (after the buffer stopped moving). */
static int chunk_resolve(chunk *c, const char *path, const kst_textmap *qmap, const kst_textmap *cmap,
                         kst_error *err) {
    for (size_t i = 0; i < c->n; i++) {
        for (size_t f = 0; f < 3; f++) {
            const char *s = c->text + c->off[i * 3 + f];
            size_t l = c->flen[i * 3 + f];
            const char **dst = f == 0 ? &c->q[i] : &c->p[i * 2 + f - 1];
            size_t *dl = f == 0 ? &c->ql[i] : &c->pl[i * 2 + f - 1];
            if (qmap) {
                const kst_textmap *m = f == 0 ? qmap : cmap;
                if (!kst_textmap_find(m, s, l, dst, dl))
                    return kst_fail(err, KST_ERR_FORMAT, "%s line %zu: unknown %s \"%.*s\" (not in %s)", path,
                                    c->line[i], f == 0 ? "qid" : "pid", (int)(l > 60 ? 60 : l), s,
                                    kst_textmap_path(m));
            } else {
                *dst = s, *dl = l;
            }
        }
    }
    return KST_OK;
}

static const chunk *sort_chunk;
static int by_query(const void *a, const void *b) {
    size_t i = *(const size_t *)a, j = *(const size_t *)b;
    const chunk *c = sort_chunk;
    size_t l = c->ql[i] < c->ql[j] ? c->ql[i] : c->ql[j];
    int r = memcmp(c->q[i], c->q[j], l);
    if (r) return r;
    if (c->ql[i] != c->ql[j]) return c->ql[i] < c->ql[j] ? -1 : 1;
    return i < j ? -1 : i > j;
}

/* Scores the chunk remotely: one request per query group, at most batch texts each. */
static int chunk_score_remote(chunk *c, kst_rerank_client *cl, size_t batch, kst_error *err) {
    int rc = KST_OK;
    const char **t = kst_malloc(batch, sizeof *t, "request", err);
    size_t *tl = kst_malloc(batch, sizeof *tl, "request", err);
    float *s = kst_malloc(batch, sizeof *s, "request", err);
    size_t *dst = kst_malloc(batch, sizeof *dst, "request", err);
    if (!t || !tl || !s || !dst) {
        rc = KST_ERR_NOMEM;
        goto done;
    }
    for (size_t i = 0; i < c->n; i++) c->order[i] = i;
    sort_chunk = c; /* qsort has no context argument in C11; one chunk is sorted at a time */
    qsort(c->order, c->n, sizeof *c->order, by_query);
    size_t g = 0;
    while (g < c->n) {
        size_t q0 = c->order[g], k = 0;
        while (g < c->n && k + 2 <= batch) {
            size_t i = c->order[g];
            if (c->ql[i] != c->ql[q0] || memcmp(c->q[i], c->q[q0], c->ql[i]) != 0) break;
            for (size_t f = 0; f < 2; f++) {
                t[k] = c->p[i * 2 + f], tl[k] = c->pl[i * 2 + f], dst[k] = i * 2 + f;
                k++;
            }
            g++;
        }
        KST_TRY(kst_rerank_score(cl, c->q[q0], c->ql[q0], t, tl, k, s, err));
        for (size_t j = 0; j < k; j++) c->score[dst[j]] = s[j];
    }
done:
    kst_free(t), kst_free(tl), kst_free(s), kst_free(dst);
    return rc;
}

static int chunk_score_local(chunk *c, kst_encoder *e, const kst_teach_opts *o, kst_error *err) {
    int rc = KST_OK;
    size_t n2 = 2 * c->n;
    const char **q = kst_malloc(n2, sizeof *q, "pairs", err);
    size_t *ql = kst_malloc(n2, sizeof *ql, "pairs", err);
    if (!q || !ql) {
        rc = KST_ERR_NOMEM;
        goto done;
    }
    for (size_t i = 0; i < c->n; i++) {
        q[2 * i] = q[2 * i + 1] = c->q[i];
        ql[2 * i] = ql[2 * i + 1] = c->ql[i];
    }
    rc = kst_encoder_score(e, q, ql, c->p, c->pl, n2, o->max_len, o->batch_size, c->score, err);
done:
    kst_free(q), kst_free(ql);
    return rc;
}

static int chunk_write(const chunk *c, FILE *f) {
    for (size_t i = 0; i < c->n; i++) {
        const char *t = c->text;
        const size_t *of = c->off + i * 3, *fl = c->flen + i * 3;
        if (fprintf(f, "%.9g\t%.9g\t%.*s\t%.*s\t%.*s\n", (double)c->score[2 * i], (double)c->score[2 * i + 1],
                    (int)fl[0], t + of[0], (int)fl[1], t + of[1], (int)fl[2], t + of[2]) < 0)
            return -1;
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* kst_teach */

int kst_teach(const kst_teach_opts *o, kst_teach_result *res, kst_error *err) {
    int rc = KST_OK;
    memset(res, 0, sizeof *res);
    if (!o->triples_path || !o->out_path)
        return kst_fail(err, KST_ERR_INVALID, "teach needs a triples file and an output path");
    if (!!o->model_dir == !!o->teacher_url)
        return kst_fail(err, KST_ERR_INVALID, "teach needs one teacher: a model folder or a teacher URL");
    if (!!o->queries_path != !!o->collection_path)
        return kst_fail(err, KST_ERR_INVALID, "give both --queries and --collection (id triples) or neither (text triples)");
    kst_encoder *e = NULL;
    kst_rerank_client *cl = NULL;
    kst_textmap *qmap = NULL, *cmap = NULL;
    kst_stream *in = NULL;
    FILE *f = NULL;
    chunk c;
    memset(&c, 0, sizeof c);
    char tmp[4096];
    tmp[0] = '\0';
    size_t batch = o->batch_size ? o->batch_size : 32, per = o->chunk ? o->chunk : 2048;
    if (batch < 2) batch = 2;
    if (o->model_dir) {
        if (o->num_threads > 0) kst_set_num_threads(o->num_threads);
        KST_TRY(kst_encoder_open(o->model_dir, KST_ROLE_AUTO, &e, err));
        if (e->role != KST_ROLE_CROSS) {
            rc = kst_fail(err, KST_ERR_INVALID, "%s is a %s model; kestrel teach scores with a cross-encoder "
                          "(a *ForSequenceClassification folder)", o->model_dir, kst_role_name(e->role));
            goto done;
        }
        if (e->bert.cfg.NL != 1) {
            rc = kst_fail(err, KST_ERR_UNSUPPORTED, "%s: num_labels is %zu; a teacher gives one score per pair (num_labels 1)",
                          o->model_dir, e->bert.cfg.NL);
            goto done;
        }
    } else {
        KST_TRY(kst_rerank_client_open(o->teacher_url, o, &cl, err));
    }
    if (o->queries_path) {
        KST_TRY(kst_textmap_load(o->queries_path, 1, &qmap, err));
        KST_TRY(kst_textmap_load(o->collection_path, 0, &cmap, err));
    }
    KST_TRY(kst_stream_open(o->triples_path, &in, err));
    double t0 = kst_now(); /* scoring time: after the model is loaded */
    if ((size_t)snprintf(tmp, sizeof tmp, "%s.tmp.%ld", o->out_path, (long)getpid()) >= sizeof tmp) {
        tmp[0] = '\0';
        rc = kst_fail(err, KST_ERR_INVALID, "%s: path too long", o->out_path);
        goto done;
    }
    f = fopen(tmp, "w");
    if (!f) {
        rc = kst_fail(err, KST_ERR_IO, "%s: cannot create: %s", tmp, strerror(errno));
        tmp[0] = '\0';
        goto done;
    }
    kst_progress bar;
    kst_progress_begin(&bar, "teach", (size_t)kst_stream_bytes_total(in));
    if (o->quiet) bar.enabled = 0;
    uint64_t shown = 0;
    for (int eof = 0; !eof;) {
        c.n = 0, c.used = 0;
        while (c.n < per) {
            const char *line;
            size_t len;
            KST_TRY(kst_stream_getline(in, &line, &len, err));
            if (!line) {
                eof = 1;
                break;
            }
            size_t ws = 0;
            while (ws < len && (line[ws] == ' ' || line[ws] == '\t' || line[ws] == '\r')) ws++;
            if (ws == len) continue;
            size_t lineno = kst_stream_lineno(in);
            KST_TRY(chunk_add(&c, line, len, o->triples_path, lineno, qmap, cmap, err));
            c.n++;
        }
        if (c.n == 0) continue;
        KST_TRY(chunk_resolve(&c, o->triples_path, qmap, cmap, err));
        if (e) KST_TRY(chunk_score_local(&c, e, o, err));
        else KST_TRY(chunk_score_remote(&c, cl, batch, err));
        if (chunk_write(&c, f) != 0) {
            rc = kst_fail(err, KST_ERR_IO, "%s: write failed: %s", tmp, strerror(errno));
            goto done;
        }
        res->triples += c.n;
        uint64_t b = kst_stream_bytes_read(in);
        kst_progress_add(&bar, (size_t)(b - shown));
        shown = b;
        double el = kst_now() - t0;
        snprintf(bar.suffix, sizeof bar.suffix, "%zu triples, %.1f triples/s", res->triples,
                 el > 0 ? (double)res->triples / el : 0.0);
    }
    kst_progress_end(&bar);
    if (res->triples == 0) {
        rc = kst_fail(err, KST_ERR_FORMAT, "%s: has no triples", o->triples_path);
        goto done;
    }
    if (fflush(f) != 0 || fsync(fileno(f)) != 0) {
        rc = kst_fail(err, KST_ERR_IO, "%s: cannot flush: %s", tmp, strerror(errno));
        goto done;
    }
    int cr = fclose(f);
    f = NULL;
    if (cr != 0) {
        rc = kst_fail(err, KST_ERR_IO, "%s: cannot close: %s", tmp, strerror(errno));
        goto done;
    }
    if (rename(tmp, o->out_path) != 0) {
        rc = kst_fail(err, KST_ERR_IO, "%s: cannot rename into place: %s", o->out_path, strerror(errno));
        goto done;
    }
    tmp[0] = '\0';
    res->seconds = kst_now() - t0;
done:
    if (f) fclose(f);
    if (tmp[0]) unlink(tmp);
    if (cl) kst_rerank_client_counts(cl, &res->requests, &res->retries);
    chunk_free(&c);
    kst_stream_close(in);
    kst_textmap_free(qmap);
    kst_textmap_free(cmap);
    kst_rerank_client_close(cl);
    kst_encoder_free(e);
    return rc;
}
