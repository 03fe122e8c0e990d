/* test_collection.c - line streams (file, gzip, stdin, HTTP on 127.0.0.1) and the document and
 * query readers: BEIR SciFact in full, small TSV/JSONL fixtures, every bad input, allocation
 * failures. The HTTP server is a thread of this test, bound to 127.0.0.1 only. */
#include "harness.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <zlib.h>

#include "core/mem.h"
#include "core/stream.h"
#include "index/collection.h"

#define FX "tests/fixtures/collection"

static char g_tmp[256]; /* per-run temp folder */

/* ---------------------------------------------------------------------------------------------
 * Helpers: files
 * ------------------------------------------------------------------------------------------- */

static const char *tmp_path(const char *name) {
    static char buf[4][512];
    static int k = 0;
    k = (k + 1) % 4;
    snprintf(buf[k], sizeof buf[k], "%s/%s", g_tmp, name);
    return buf[k];
}

static void write_bytes(const char *path, const void *data, size_t n) {
    FILE *fp = fopen(path, "wb");
    if (!fp) fail_msg("cannot create %s", path);
    if (n && fwrite(data, 1, n, fp) != n) fail_msg("cannot write %s", path);
    fclose(fp);
}

static unsigned char *slurp(const char *path, size_t *n) {
    FILE *fp = fopen(path, "rb");
    if (!fp) return NULL;
    fseek(fp, 0, SEEK_END);
    long sz = ftell(fp);
    fseek(fp, 0, SEEK_SET);
    unsigned char *p = malloc((size_t)sz + 1);
    if (fread(p, 1, (size_t)sz, fp) != (size_t)sz) fail_msg("cannot read %s", path);
    fclose(fp);
    *n = (size_t)sz;
    return p;
}

/* Gzip-compresses data into one member (windowBits 31 = gzip wrapper); malloc'd result. */
static unsigned char *gzip_bytes(const void *data, size_t n, int level, size_t *out_n) {
    z_stream z;
    memset(&z, 0, sizeof z);
    if (deflateInit2(&z, level, Z_DEFLATED, 31, 8, Z_DEFAULT_STRATEGY) != Z_OK) fail_msg("deflateInit2");
    size_t cap = deflateBound(&z, (uLong)n) + 64;
    unsigned char *out = malloc(cap);
    z.next_in = (unsigned char *)data;
    z.avail_in = (uInt)n;
    z.next_out = out;
    z.avail_out = (uInt)cap;
    if (deflate(&z, Z_FINISH) != Z_STREAM_END) fail_msg("deflate");
    *out_n = z.total_out;
    deflateEnd(&z);
    return out;
}

/* Writes `path` as gzip of the file `src`, split into `members` gzip members. */
static void gzip_file(const char *src, const char *path, int members) {
    size_t n, at = 0;
    unsigned char *data = slurp(src, &n);
    assert_non_null(data);
    FILE *fp = fopen(path, "wb");
    for (int m = 0; m < members; m++) {
        size_t part = m == members - 1 ? n - at : n / (size_t)members;
        size_t zn;
        unsigned char *z = gzip_bytes(data + at, part, 1, &zn);
        fwrite(z, 1, zn, fp);
        free(z);
        at += part;
    }
    fclose(fp);
    free(data);
}

/* ---------------------------------------------------------------------------------------------
 * Helpers: readers
 * ------------------------------------------------------------------------------------------- */

static uint64_t fnv(uint64_t h, const void *p, size_t n) {
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++) h = (h ^ b[i]) * 1099511628211ull;
    return ((h ^ 0x1f) * 1099511628211ull) ^ n; /* field separator and length */
}

static uint64_t doc_hash(uint64_t h, const kst_doc *d) {
    h = fnv(h, d->id, d->id_len);
    h = fnv(h, d->title, d->title_len);
    h = fnv(h, d->text, d->text_len);
    if (d->meta_json) h = fnv(h, d->meta_json, d->meta_len);
    return h;
}

/* Reads every document; returns the status, the count and a hash of all fields. */
static int read_docs(const char *path, kst_rec_format fmt, size_t *count, uint64_t *hash,
                     kst_error *err) {
    kst_docs *r = NULL;
    *count = 0;
    *hash = 1469598103934665603ull;
    int rc = kst_docs_open(path, fmt, &r, err);
    if (rc != KST_OK) return rc;
    kst_doc d;
    while ((rc = kst_docs_next(r, &d, err)) == KST_OK && d.id) {
        (*count)++;
        *hash = doc_hash(*hash, &d);
    }
    kst_docs_close(r);
    return rc;
}

static int read_queries(const char *path, kst_rec_format fmt, size_t *count, uint64_t *hash,
                        kst_error *err) {
    kst_queries *r = NULL;
    *count = 0;
    *hash = 1469598103934665603ull;
    int rc = kst_queries_open(path, fmt, &r, err);
    if (rc != KST_OK) return rc;
    kst_query q;
    while ((rc = kst_queries_next(r, &q, err)) == KST_OK && q.id) {
        (*count)++;
        *hash = fnv(fnv(*hash, q.id, q.id_len), q.text, q.text_len);
    }
    kst_queries_close(r);
    return rc;
}

/* Reads two document sources in lockstep and asserts equal records; returns the count. */
static size_t assert_same_docs(const char *a, const char *b) {
    kst_error err = {0};
    kst_docs *ra = NULL, *rb = NULL;
    assert_ok(kst_docs_open(a, KST_FORMAT_AUTO, &ra, &err), &err);
    assert_ok(kst_docs_open(b, KST_FORMAT_AUTO, &rb, &err), &err);
    assert_int_equal(kst_docs_format(ra), kst_docs_format(rb));
    size_t n = 0;
    for (;;) {
        kst_doc x, y;
        assert_ok(kst_docs_next(ra, &x, &err), &err);
        assert_ok(kst_docs_next(rb, &y, &err), &err);
        if (!x.id || !y.id) {
            if (x.id || y.id) fail_msg("%s and %s differ in length after %zu docs", a, b, n);
            break;
        }
        n++;
        if (x.id_len != y.id_len || memcmp(x.id, y.id, x.id_len) || x.title_len != y.title_len ||
            memcmp(x.title, y.title, x.title_len) || x.text_len != y.text_len ||
            memcmp(x.text, y.text, x.text_len) || !x.meta_json != !y.meta_json ||
            (x.meta_json && strcmp(x.meta_json, y.meta_json)))
            fail_msg("%s and %s differ at doc %zu (id %s vs %s)", a, b, n, x.id, y.id);
    }
    kst_docs_close(ra);
    kst_docs_close(rb);
    return n;
}

/* Reads documents until the end or an error; asserts the error code and message pieces. */
static void expect_docs_error(const char *path, kst_rec_format fmt, int code, const char *n1,
                              const char *n2) {
    kst_error err = {0};
    size_t count;
    uint64_t h;
    int rc = read_docs(path, fmt, &count, &h, &err);
    if (rc != code)
        fail_msg("%s: expected %s, got %s: %s", path, kst_status_name(code), kst_status_name(rc),
                 err.msg);
    assert_int_equal(err.code, code);
    if (n1) assert_msg_has(err.msg, n1);
    if (n2) assert_msg_has(err.msg, n2);
}

static void expect_queries_error(const char *path, int code, const char *n1, const char *n2) {
    kst_error err = {0};
    size_t count;
    uint64_t h;
    int rc = read_queries(path, KST_FORMAT_AUTO, &count, &h, &err);
    if (rc != code)
        fail_msg("%s: expected %s, got %s: %s", path, kst_status_name(code), kst_status_name(rc),
                 err.msg);
    if (n1) assert_msg_has(err.msg, n1);
    if (n2) assert_msg_has(err.msg, n2);
}

#define assert_field(ptr, len, want)                                                       \
    do {                                                                                   \
        const char *w_ = (want);                                                           \
        if ((len) != strlen(w_) || memcmp((ptr), w_, (len)) != 0)                          \
            fail_msg("%s is \"%.*s\", expected \"%s\"", #ptr, (int)(len), (ptr), w_);      \
    } while (0)

/* ---------------------------------------------------------------------------------------------
 * A tiny HTTP/1.1 server on 127.0.0.1 (one thread per connection, one request each).
 *   /f/<name>  file from FX;  /s/<rel> file from shared_dir();  /t/<name> file from g_tmp;
 *   prefixes:  /ce/...        body gzip-compressed with "Content-Encoding: gzip";
 *              /chunked/...   "Transfer-Encoding: chunked" in 1000-byte chunks;
 *              /cut/...       full Content-Length, half the body, then close;
 *              /redirect/...  302 to the rest of the path.
 *   Anything missing is 404. The server stops when asked or after 60 s, whichever comes first.
 * ------------------------------------------------------------------------------------------- */

typedef struct http_server {
    int fd, port;
    pthread_t thread;
    atomic_int stop;
    pthread_t conns[256];
    int nconns;
} http_server;

static http_server g_http;

static int send_all(int fd, const void *p, size_t n) {
    const char *c = p;
    while (n) {
        ssize_t k = send(fd, c, n, MSG_NOSIGNAL);
        if (k <= 0) {
            if (k < 0 && errno == EINTR) continue;
            return -1;
        }
        c += k;
        n -= (size_t)k;
    }
    return 0;
}

static void respond_status(int fd, int status, const char *reason, const char *extra) {
    char head[1024];
    int n = snprintf(head, sizeof head,
                     "HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\nContent-Length: %zu\r\n%s"
                     "Connection: close\r\n\r\n%s",
                     status, reason, strlen(reason), extra ? extra : "", reason);
    send_all(fd, head, (size_t)n);
}

static void serve(int fd) {
    char req[8192];
    size_t got = 0;
    while (got < sizeof req - 1) {
        ssize_t k = recv(fd, req + got, sizeof req - 1 - got, 0);
        if (k <= 0) return;
        got += (size_t)k;
        req[got] = '\0';
        if (strstr(req, "\r\n\r\n")) break;
    }
    char path[2048];
    if (sscanf(req, "GET %2047s HTTP/1.1", path) != 1) return respond_status(fd, 400, "Bad Request", NULL);
    const char *p = path;
    int ce = 0, chunked = 0, cut = 0;
    if (strncmp(p, "/redirect/", 10) == 0) {
        char loc[2100];
        snprintf(loc, sizeof loc, "Location: %s\r\n", p + 9);
        return respond_status(fd, 302, "Found", loc);
    }
    for (;;) {
        if (strncmp(p, "/ce/", 4) == 0) ce = 1, p += 3;
        else if (strncmp(p, "/chunked/", 9) == 0) chunked = 1, p += 8;
        else if (strncmp(p, "/cut/", 5) == 0) cut = 1, p += 4;
        else break;
    }
    char file[4096];
    if (strstr(p, "..")) return respond_status(fd, 404, "Not Found", NULL);
    if (strncmp(p, "/f/", 3) == 0) snprintf(file, sizeof file, "%s/%s", FX, p + 3);
    else if (strncmp(p, "/s/", 3) == 0) snprintf(file, sizeof file, "%s/%s", shared_dir(), p + 3);
    else if (strncmp(p, "/t/", 3) == 0) snprintf(file, sizeof file, "%s/%s", g_tmp, p + 3);
    else return respond_status(fd, 404, "Not Found", NULL);
    size_t n;
    unsigned char *body = slurp(file, &n);
    if (!body) return respond_status(fd, 404, "Not Found", NULL);
    if (ce) {
        size_t zn;
        unsigned char *z = gzip_bytes(body, n, 6, &zn);
        free(body);
        body = z;
        n = zn;
    }
    char head[512];
    int hn;
    if (chunked)
        hn = snprintf(head, sizeof head,
                      "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n%sConnection: close\r\n\r\n",
                      ce ? "Content-Encoding: gzip\r\n" : "");
    else
        hn = snprintf(head, sizeof head,
                      "HTTP/1.1 200 OK\r\nContent-Length: %zu\r\n%sConnection: close\r\n\r\n", n,
                      ce ? "Content-Encoding: gzip\r\n" : "");
    if (send_all(fd, head, (size_t)hn) == 0) {
        size_t send_n = cut ? n / 2 : n;
        if (!chunked) {
            send_all(fd, body, send_n);
        } else {
            for (size_t at = 0; at < send_n; at += 1000) {
                size_t k = send_n - at < 1000 ? send_n - at : 1000;
                char ch[32];
                int cn = snprintf(ch, sizeof ch, "%zx\r\n", k);
                if (send_all(fd, ch, (size_t)cn) || send_all(fd, body + at, k) ||
                    send_all(fd, "\r\n", 2))
                    break;
            }
            if (!cut) send_all(fd, "0\r\n\r\n", 5);
        }
    }
    free(body);
}

static void *conn_main(void *arg) {
    int fd = (int)(intptr_t)arg;
    serve(fd);
    shutdown(fd, SHUT_WR);
    close(fd);
    return NULL;
}

static void *server_main(void *arg) {
    http_server *s = arg;
    double until = (double)time(NULL) + 60;
    while (!atomic_load(&s->stop) && (double)time(NULL) < until) {
        struct pollfd pfd = {s->fd, POLLIN, 0};
        if (poll(&pfd, 1, 50) <= 0) continue;
        int c = accept(s->fd, NULL, NULL);
        if (c < 0) continue;
        struct timeval tv = {10, 0}; /* a stuck client cannot hold a connection thread forever */
        setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        setsockopt(c, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
        if (s->nconns < (int)(sizeof s->conns / sizeof s->conns[0]) &&
            pthread_create(&s->conns[s->nconns], NULL, conn_main, (void *)(intptr_t)c) == 0)
            s->nconns++;
        else
            conn_main((void *)(intptr_t)c);
    }
    for (int i = 0; i < s->nconns; i++) pthread_join(s->conns[i], NULL);
    close(s->fd);
    return NULL;
}

static void server_start(http_server *s) {
    memset(s, 0, sizeof *s);
    s->fd = socket(AF_INET, SOCK_STREAM, 0);
    assert_true(s->fd >= 0);
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = 0; /* ephemeral */
    assert_int_equal(bind(s->fd, (struct sockaddr *)&a, sizeof a), 0);
    assert_int_equal(listen(s->fd, 16), 0);
    socklen_t len = sizeof a;
    assert_int_equal(getsockname(s->fd, (struct sockaddr *)&a, &len), 0);
    s->port = ntohs(a.sin_port);
    assert_int_equal(pthread_create(&s->thread, NULL, server_main, s), 0);
}

static void server_stop(http_server *s) {
    atomic_store(&s->stop, 1);
    pthread_join(s->thread, NULL);
}

static const char *url(const char *rest) {
    static char buf[4][1024];
    static int k = 0;
    k = (k + 1) % 4;
    snprintf(buf[k], sizeof buf[k], "http://127.0.0.1:%d%s", g_http.port, rest);
    return buf[k];
}

/* ---------------------------------------------------------------------------------------------
 * Setup
 * ------------------------------------------------------------------------------------------- */

static int setup(void **state) {
    snprintf(g_tmp, sizeof g_tmp, "/tmp/kst_collection_XXXXXX");
    if (!mkdtemp(g_tmp)) return -1;
    /* Loopback only: no proxy may be asked for 127.0.0.1. */
    const char *proxies[] = {"http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy",
                             "ALL_PROXY"};
    for (size_t i = 0; i < sizeof proxies / sizeof proxies[0]; i++) unsetenv(proxies[i]);
    setenv("no_proxy", "*", 1);
    server_start(&g_http);
    return 0;
}

static int teardown(void **state) {
    server_stop(&g_http);
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", g_tmp);
    return system(cmd) == 0 ? 0 : -1;
}

/* ---------------------------------------------------------------------------------------------
 * Streams
 * ------------------------------------------------------------------------------------------- */

static void next_line_is(kst_stream *s, const char *want) {
    kst_error err = {0};
    const char *line;
    size_t len;
    assert_ok(kst_stream_getline(s, &line, &len, &err), &err);
    if (!want) {
        if (line) fail_msg("expected the end, got \"%.*s\"", (int)len, line);
        return;
    }
    if (!line) fail_msg("expected \"%s\", got the end", want);
    assert_field(line, len, want);
    assert_int_equal(line[len], '\0');
}

static void test_stream_line_ends(void **state) {
    const char *p = tmp_path("ends.txt");
    write_bytes(p, "\xEF\xBB\xBF" "a\nb\r\n\n\r\nlast\r", 16);
    kst_error err = {0};
    kst_stream *s = NULL;
    assert_ok(kst_stream_open(p, &s, &err), &err);
    assert_string_equal(kst_stream_name(s), p);
    assert_int_equal(kst_stream_is_gzip(s), 0);
    next_line_is(s, "a"); /* BOM dropped */
    next_line_is(s, "b");
    next_line_is(s, "");
    next_line_is(s, "");
    next_line_is(s, "last");
    assert_int_equal(kst_stream_lineno(s), 5);
    next_line_is(s, NULL);
    next_line_is(s, NULL); /* the end stays the end */
    assert_int_equal(kst_stream_bytes_read(s), 16);
    assert_int_equal(kst_stream_bytes_total(s), 16);
    kst_stream_close(s);
    kst_stream_close(NULL);

    /* An empty file is an empty stream. */
    assert_ok(kst_stream_open(FX "/empty.jsonl", &s, &err), &err);
    next_line_is(s, NULL);
    kst_stream_close(s);
}

/* Many lines of varied length, some far beyond the 64 KiB read chunk, plain and gzip. */
static void test_stream_many_lines(void **state) {
    enum { N = 20000 };
    const char *p = tmp_path("many.txt"), *pz = tmp_path("many.txt.gz");
    FILE *fp = fopen(p, "wb");
    char *line = malloc(300001);
    for (int i = 0; i < N; i++) {
        size_t n = i % 5000 == 17 ? 300000 : (size_t)(i * 7919) % 300;
        for (size_t j = 0; j < n; j++) line[j] = (char)('a' + (i + j) % 26);
        fwrite(line, 1, n, fp);
        fputs(i % 3 ? "\n" : "\r\n", fp);
    }
    fclose(fp);
    gzip_file(p, pz, 3);
    for (int pass = 0; pass < 2; pass++) {
        kst_error err = {0};
        kst_stream *s = NULL;
        assert_ok(kst_stream_open(pass ? pz : p, &s, &err), &err);
        assert_int_equal(kst_stream_is_gzip(s), pass);
        for (int i = 0; i < N; i++) {
            const char *got;
            size_t len, n = i % 5000 == 17 ? 300000 : (size_t)(i * 7919) % 300;
            assert_ok(kst_stream_getline(s, &got, &len, &err), &err);
            assert_non_null(got);
            if (len != n) fail_msg("line %d: length %zu, expected %zu", i + 1, len, n);
            for (size_t j = 0; j < n; j++)
                if (got[j] != (char)('a' + (i + j) % 26)) fail_msg("line %d byte %zu differs", i + 1, j);
        }
        next_line_is(s, NULL);
        assert_int_equal(kst_stream_bytes_read(s), kst_stream_bytes_total(s));
        kst_stream_close(s);
    }
    free(line);
}

static void test_stream_max_line(void **state) {
    const char *p = tmp_path("long.txt");
    write_bytes(p, "12345\r\n123456\nnever\n", 20);
    kst_error err = {0};
    kst_stream *s = NULL;
    assert_ok(kst_stream_open(p, &s, &err), &err);
    kst_stream_set_max_line(s, 5);
    next_line_is(s, "12345"); /* exactly the limit, "\r" not counted */
    const char *line;
    size_t len;
    assert_int_equal(kst_stream_getline(s, &line, &len, &err), KST_ERR_FORMAT);
    assert_null(line);
    assert_msg_has(err.msg, p);
    assert_msg_has(err.msg, "line 2 is longer than 5 bytes");
    kst_error again = {0};
    assert_int_equal(kst_stream_getline(s, &line, &len, &again), KST_ERR_FORMAT); /* sticky */
    assert_string_equal(again.msg, err.msg);
    kst_stream_close(s);

    /* Without any newline, the limit holds while the line is still being read. */
    char big[5000];
    memset(big, 'x', sizeof big);
    write_bytes(p, big, sizeof big);
    assert_ok(kst_stream_open(p, &s, &err), &err);
    kst_stream_set_max_line(s, 100);
    assert_int_equal(kst_stream_getline(s, &line, &len, &err), KST_ERR_FORMAT);
    assert_msg_has(err.msg, "line 1 is longer than 100 bytes");
    kst_stream_close(s);
}

/* The default 64 MiB limit, on a line of 64 MiB + 1 that gzip keeps small on disk. */
static void test_stream_default_limit(void **state) {
    const char *pz = tmp_path("huge.gz");
    FILE *fp = fopen(pz, "wb");
    z_stream z;
    memset(&z, 0, sizeof z);
    assert_int_equal(deflateInit2(&z, 1, Z_DEFLATED, 31, 8, Z_DEFAULT_STRATEGY), Z_OK);
    static unsigned char in[1 << 20], out[1 << 16];
    memset(in, 'a', sizeof in);
    size_t left = KST_STREAM_MAX_LINE + 1;
    int flush = Z_NO_FLUSH;
    while (flush != Z_FINISH) {
        size_t k = left < sizeof in ? left : sizeof in;
        left -= k;
        flush = left ? Z_NO_FLUSH : Z_FINISH;
        z.next_in = in;
        z.avail_in = (uInt)k;
        do {
            z.next_out = out;
            z.avail_out = sizeof out;
            deflate(&z, flush);
            fwrite(out, 1, sizeof out - z.avail_out, fp);
        } while (z.avail_out == 0);
    }
    deflateEnd(&z);
    fclose(fp);
    kst_error err = {0};
    kst_stream *s = NULL;
    assert_ok(kst_stream_open(pz, &s, &err), &err);
    const char *line;
    size_t len;
    assert_int_equal(kst_stream_getline(s, &line, &len, &err), KST_ERR_FORMAT);
    assert_msg_has(err.msg, "line 1 is longer than 67108864 bytes");
    kst_stream_close(s);
}

static void test_stream_stdin(void **state) {
    int saved = dup(0);
    int fd = open(FX "/docs_title.tsv", O_RDONLY);
    assert_true(saved >= 0 && fd >= 0);
    dup2(fd, 0);
    close(fd);
    kst_error err = {0};
    kst_docs *r = NULL;
    assert_ok(kst_docs_open("-", KST_FORMAT_AUTO, &r, &err), &err);
    assert_string_equal(kst_stream_name(kst_docs_stream(r)), "<stdin>");
    kst_doc d;
    size_t n = 0;
    while (kst_docs_next(r, &d, &err) == KST_OK && d.id) n++;
    assert_int_equal(n, 3);
    kst_docs_close(r);
    dup2(saved, 0);
    close(saved);
}

static void test_stream_open_errors(void **state) {
    kst_error err = {0};
    kst_stream *s = (kst_stream *)1;
    assert_int_equal(kst_stream_open(FX "/no-such-file.tsv", &s, &err), KST_ERR_NOTFOUND);
    assert_null(s);
    assert_msg_has(err.msg, "no-such-file.tsv");
    assert_int_equal(kst_stream_open(FX, &s, &err), KST_ERR_IO);
    assert_msg_has(err.msg, "is a directory");
    assert_int_equal(kst_stream_open("", &s, &err), KST_ERR_INVALID);
    assert_int_equal(kst_stream_open("ftp://127.0.0.1/x.tsv", &s, &err), KST_ERR_UNSUPPORTED);
    assert_msg_has(err.msg, "only http:// and https:// URLs");
}

/* ---------------------------------------------------------------------------------------------
 * BEIR SciFact, in full
 * ------------------------------------------------------------------------------------------- */

static void test_scifact_corpus(void **state) {
    const char *path = shared_path("beir-scifact/corpus.jsonl");
    if (access(path, R_OK) != 0) skip_because("%s is not readable", path);
    kst_error err = {0};
    kst_docs *r = NULL;
    assert_ok(kst_docs_open(path, KST_FORMAT_AUTO, &r, &err), &err);
    assert_int_equal(kst_docs_format(r), KST_FORMAT_BEIR);
    kst_doc d;
    size_t n = 0, text_bytes = 0, seen = 0;
    while (kst_docs_next(r, &d, &err) == KST_OK && d.id) {
        n++;
        text_bytes += d.text_len;
        assert_int_equal(d.line, n);
        assert_non_null(d.meta_json);
        assert_string_equal(d.meta_json, "{}");
        if (n == 1) {
            assert_field(d.id, d.id_len, "4983");
            assert_field(d.title, d.title_len,
                         "Microstructural development of human newborn cerebral white matter "
                         "assessed in vivo by diffusion tensor magnetic resonance imaging.");
            assert_int_equal(d.text_len, 1809);
            seen++;
        } else if (n == 2) {
            assert_field(d.id, d.id_len, "5836");
            assert_field(d.title, d.title_len, "Induction of myelodysplasia by myeloid-derived suppressor cells.");
            seen++;
        } else if (strcmp(d.id, "159469") == 0) {
            /* "\u2013" in the file: decoded to UTF-8 E2 80 93 */
            const char *want = "HTRF: A Technology Tailored for Drug Discovery \xE2\x80\x93" "A Review";
            assert_memory_equal(d.title, want, strlen(want));
            assert_int_equal(d.title_len, 105);
            seen++;
        } else if (n == 5183) {
            assert_field(d.id, d.id_len, "198309074");
            seen++;
        }
    }
    assert_int_equal(err.code, KST_OK);
    assert_int_equal(n, 5183);
    assert_int_equal(seen, 4);
    assert_int_equal(text_bytes, 7282680); /* sum of UTF-8 text lengths, by Python's json */
    kst_stream *s = kst_docs_stream(r);
    assert_int_equal(kst_stream_bytes_read(s), 8124349);
    assert_int_equal(kst_stream_bytes_total(s), 8124349);
    kst_docs_close(r);
}

static void test_scifact_queries(void **state) {
    const char *path = shared_path("beir-scifact/queries.jsonl");
    if (access(path, R_OK) != 0) skip_because("%s is not readable", path);
    kst_error err = {0};
    kst_queries *r = NULL;
    assert_ok(kst_queries_open(path, KST_FORMAT_AUTO, &r, &err), &err);
    assert_int_equal(kst_queries_format(r), KST_FORMAT_BEIR);
    kst_query q;
    size_t n = 0;
    while (kst_queries_next(r, &q, &err) == KST_OK && q.id) {
        n++;
        assert_null(strstr(q.text, "SUPPORT"));
        assert_null(strstr(q.text, "CONTRADICT"));
        if (n == 1) {
            assert_field(q.id, q.id_len, "0");
            assert_field(q.text, q.text_len, "0-dimensional biomaterials lack inductive properties.");
        } else if (n == 2) {
            assert_field(q.id, q.id_len, "2"); /* its metadata holds CONTRADICT: not in the text */
            assert_field(q.text, q.text_len, "1 in 5 million in UK have abnormal PrP positivity.");
        } else if (n == 1109) {
            assert_field(q.id, q.id_len, "1395");
            assert_field(q.text, q.text_len,
                         "p16INK4A accumulation is  linked to an abnormal wound response caused by the "
                         "microinvasive step of advanced Oral Potentially Malignant Lesions (OPMLs).");
        }
    }
    assert_int_equal(err.code, KST_OK);
    assert_int_equal(n, 1109);
    kst_queries_close(r);
}

/* ---------------------------------------------------------------------------------------------
 * Small fixtures
 * ------------------------------------------------------------------------------------------- */

static void test_tsv_docs(void **state) {
    kst_error err = {0};
    kst_docs *r = NULL;
    kst_doc d;
    assert_ok(kst_docs_open(FX "/docs.tsv", KST_FORMAT_AUTO, &r, &err), &err);
    assert_int_equal(kst_docs_format(r), KST_FORMAT_TSV);
    static const char *want[][2] = {
        {"d1", "The quick brown fox."},
        {"d2", "Caf\xC3\xA9 au lait, na\xC3\xAFve r\xC3\xA9sum\xC3\xA9."},
        {"d3", ""},
        {"d-\xC3\xA9t\xC3\xA9", "Summer in French: \xC3\xA9t\xC3\xA9."},
        {"d5", "Bad byte \xFF kept in text."}, /* invalid UTF-8 in text is kept */
    };
    static const size_t lines[] = {1, 2, 4, 5, 6};
    for (size_t i = 0; i < 5; i++) {
        assert_ok(kst_docs_next(r, &d, &err), &err);
        assert_non_null(d.id);
        assert_field(d.id, d.id_len, want[i][0]);
        assert_field(d.text, d.text_len, want[i][1]);
        assert_field(d.title, d.title_len, "");
        assert_null(d.meta_json);
        assert_int_equal(d.line, lines[i]);
    }
    assert_ok(kst_docs_next(r, &d, &err), &err);
    assert_null(d.id);
    assert_ok(kst_docs_next(r, &d, &err), &err);
    assert_null(d.id);
    kst_docs_close(r);

    assert_ok(kst_docs_open(FX "/docs_title.tsv", KST_FORMAT_AUTO, &r, &err), &err);
    assert_ok(kst_docs_next(r, &d, &err), &err);
    assert_field(d.id, d.id_len, "p1");
    assert_field(d.title, d.title_len, "First title");
    assert_field(d.text, d.text_len, "First passage text.");
    assert_ok(kst_docs_next(r, &d, &err), &err);
    assert_field(d.title, d.title_len, "");
    assert_field(d.text, d.text_len, "No title here.");
    assert_ok(kst_docs_next(r, &d, &err), &err);
    assert_field(d.text, d.text_len, "Text with \"quotes\" and \\backslash.");
    kst_docs_close(r);

    /* CRLF line ends and a byte-order mark are not part of the records. */
    assert_ok(kst_docs_open(FX "/crlf.tsv", KST_FORMAT_AUTO, &r, &err), &err);
    const char *crlf[] = {"Windows line one", "Windows line two", "last line without newline"};
    for (int i = 0; i < 3; i++) {
        assert_ok(kst_docs_next(r, &d, &err), &err);
        assert_field(d.text, d.text_len, crlf[i]);
    }
    assert_ok(kst_docs_next(r, &d, &err), &err);
    assert_null(d.id);
    kst_docs_close(r);
    assert_ok(kst_docs_open(FX "/bom.tsv", KST_FORMAT_AUTO, &r, &err), &err);
    assert_ok(kst_docs_next(r, &d, &err), &err);
    assert_field(d.id, d.id_len, "m1");
    kst_docs_close(r);
}

static void test_jsonl_docs(void **state) {
    kst_error err = {0};
    kst_docs *r = NULL;
    kst_doc d;
    assert_ok(kst_docs_open(FX "/beir.jsonl", KST_FORMAT_AUTO, &r, &err), &err);
    assert_int_equal(kst_docs_format(r), KST_FORMAT_BEIR);
    assert_ok(kst_docs_next(r, &d, &err), &err);
    assert_field(d.id, d.id_len, "b1");
    assert_field(d.title, d.title_len, "Alpha");
    assert_string_equal(d.meta_json, "{}");
    assert_ok(kst_docs_next(r, &d, &err), &err);
    assert_field(d.id, d.id_len, "b2");
    assert_field(d.title, d.title_len, "");
    assert_string_equal(d.meta_json, "{\"url\":\"http://x/y\",\"year\":2020,\"tags\":[\"a\",\"b\"]}");
    assert_int_equal(d.meta_len, strlen(d.meta_json));
    assert_ok(kst_docs_next(r, &d, &err), &err);
    assert_field(d.id, d.id_len, "b3");
    assert_int_equal(d.line, 4);
    assert_field(d.title, d.title_len, "");
    assert_field(d.text, d.text_len, "Null title \xC3\xA9\xF0\x9F\x98\x80.");
    assert_null(d.meta_json);
    assert_ok(kst_docs_next(r, &d, &err), &err);
    assert_field(d.id, d.id_len, "b4");
    assert_field(d.title, d.title_len, "Delta");
    assert_ok(kst_docs_next(r, &d, &err), &err);
    assert_null(d.id);
    kst_docs_close(r);

    assert_ok(kst_docs_open(FX "/pyserini.jsonl", KST_FORMAT_AUTO, &r, &err), &err);
    assert_int_equal(kst_docs_format(r), KST_FORMAT_PYSERINI);
    assert_ok(kst_docs_next(r, &d, &err), &err);
    assert_field(d.id, d.id_len, "p1");
    assert_field(d.title, d.title_len, "");
    assert_field(d.text, d.text_len, "First title\nFirst passage text.");
    assert_ok(kst_docs_next(r, &d, &err), &err);
    assert_field(d.text, d.text_len, "Second \xC3\xA9l\xC3\xA8ve");
    assert_ok(kst_docs_next(r, &d, &err), &err);
    assert_null(d.id);
    kst_docs_close(r);

    /* Empty and blank inputs: no documents, no error. */
    size_t n;
    uint64_t h;
    assert_ok(kst_docs_open(FX "/empty.jsonl", KST_FORMAT_AUTO, &r, &err), &err);
    assert_int_equal(kst_docs_format(r), KST_FORMAT_AUTO);
    kst_docs_close(r);
    assert_ok(read_docs(FX "/empty.jsonl", KST_FORMAT_AUTO, &n, &h, &err), &err);
    assert_int_equal(n, 0);
    assert_ok(read_docs(FX "/blank_lines.tsv", KST_FORMAT_AUTO, &n, &h, &err), &err);
    assert_int_equal(n, 0);
    assert_ok(read_queries(FX "/empty.jsonl", KST_FORMAT_AUTO, &n, &h, &err), &err);
    assert_int_equal(n, 0);
}

static void test_queries(void **state) {
    kst_error err = {0};
    kst_queries *r = NULL;
    kst_query q;
    assert_ok(kst_queries_open(FX "/queries.tsv", KST_FORMAT_AUTO, &r, &err), &err);
    assert_int_equal(kst_queries_format(r), KST_FORMAT_TSV);
    assert_ok(kst_queries_next(r, &q, &err), &err);
    assert_field(q.id, q.id_len, "q1");
    assert_field(q.text, q.text_len, "what is a fox");
    assert_ok(kst_queries_next(r, &q, &err), &err);
    assert_field(q.text, q.text_len, "caf\xC3\xA9 r\xC3\xA9sum\xC3\xA9");
    assert_ok(kst_queries_next(r, &q, &err), &err);
    assert_null(q.id);
    kst_queries_close(r);

    assert_ok(kst_queries_open(FX "/queries.jsonl", KST_FORMAT_AUTO, &r, &err), &err);
    assert_int_equal(kst_queries_format(r), KST_FORMAT_BEIR);
    assert_ok(kst_queries_next(r, &q, &err), &err);
    assert_field(q.id, q.id_len, "q1");
    assert_field(q.text, q.text_len, "what is a fox");
    assert_ok(kst_queries_next(r, &q, &err), &err);
    assert_field(q.id, q.id_len, "q2");
    kst_queries_close(r);

    assert_int_equal(kst_queries_open(FX "/queries.tsv", KST_FORMAT_PYSERINI, &r, &err), KST_ERR_INVALID);
    assert_null(r);
    expect_queries_error(FX "/queries_three_columns.tsv", KST_ERR_FORMAT, "line 1",
                         "expected 2 tab-separated columns (qid, text), found 3");
    expect_queries_error(FX "/missing_id.jsonl", KST_ERR_FORMAT, "line 2", "missing \"_id\"");
}

static void test_format_override(void **state) {
    kst_rec_format f;
    kst_error err = {0};
    assert_ok(kst_rec_format_parse("pyserini", &f, &err), &err);
    assert_int_equal(f, KST_FORMAT_PYSERINI);
    assert_string_equal(kst_rec_format_name(KST_FORMAT_BEIR), "beir");
    assert_int_equal(kst_rec_format_parse("csv", &f, &err), KST_ERR_INVALID);
    assert_msg_has(err.msg, "csv");

    /* Forced formats: Pyserini keys read as BEIR lack "_id"; JSON read as TSV has one column. */
    expect_docs_error(FX "/pyserini.jsonl", KST_FORMAT_BEIR, KST_ERR_FORMAT, "line 1", "missing \"_id\"");
    expect_docs_error(FX "/beir.jsonl", KST_FORMAT_PYSERINI, KST_ERR_FORMAT, "line 1", "missing \"id\"");
    expect_docs_error(FX "/beir.jsonl", KST_FORMAT_TSV, KST_ERR_FORMAT, "line 1", "columns (id, [title,] text), found 1");
    expect_docs_error(FX "/docs.tsv", KST_FORMAT_BEIR, KST_ERR_FORMAT, "line 1, column 1", "invalid JSON");
    size_t n;
    uint64_t h1, h2;
    assert_ok(read_docs(FX "/beir.jsonl", KST_FORMAT_BEIR, &n, &h1, &err), &err);
    assert_ok(read_docs(FX "/beir.jsonl", KST_FORMAT_AUTO, &n, &h2, &err), &err);
    assert_true(h1 == h2);
}

/* ---------------------------------------------------------------------------------------------
 * Gzip
 * ------------------------------------------------------------------------------------------- */

static void test_gzip_same_records(void **state) {
    /* gzip(1) output (with a file name in the header), two concatenated members, and gzip data
     * under a name without ".gz": all read as their plain originals. */
    assert_int_equal(assert_same_docs(FX "/docs.tsv", FX "/docs.tsv.gz"), 5);
    assert_int_equal(assert_same_docs(FX "/docs_title.tsv", FX "/docs_title_concat.tsv.gz"), 3);
    assert_int_equal(assert_same_docs(FX "/beir.jsonl", FX "/beir_gzip_no_suffix.jsonl"), 4);
    kst_error err = {0};
    kst_stream *s = NULL;
    assert_ok(kst_stream_open(FX "/docs.tsv.gz", &s, &err), &err);
    assert_int_equal(kst_stream_is_gzip(s), 1);
    kst_stream_close(s);

    const char *corpus = shared_path("beir-scifact/corpus.jsonl");
    if (access(corpus, R_OK) != 0) skip_because("%s is not readable", corpus);
    char plain[4096];
    snprintf(plain, sizeof plain, "%s", corpus);
    gzip_file(plain, tmp_path("corpus.jsonl.gz"), 1);
    gzip_file(plain, tmp_path("corpus2.jsonl.gz"), 2);
    assert_int_equal(assert_same_docs(plain, tmp_path("corpus.jsonl.gz")), 5183);
    assert_int_equal(assert_same_docs(plain, tmp_path("corpus2.jsonl.gz")), 5183);

    const char *qpath = shared_path("beir-scifact/queries.jsonl");
    char qplain[4096];
    snprintf(qplain, sizeof qplain, "%s", qpath);
    gzip_file(qplain, tmp_path("queries.jsonl.gz"), 1);
    size_t n1, n2;
    uint64_t h1, h2;
    assert_ok(read_queries(qplain, KST_FORMAT_AUTO, &n1, &h1, &err), &err);
    assert_ok(read_queries(tmp_path("queries.jsonl.gz"), KST_FORMAT_AUTO, &n2, &h2, &err), &err);
    assert_int_equal(n1, 1109);
    assert_int_equal(n2, 1109);
    assert_true(h1 == h2);
}

static void test_gzip_bad(void **state) {
    size_t n, zn;
    unsigned char *data = slurp(FX "/beir.jsonl", &n);
    unsigned char *z = gzip_bytes(data, n, 6, &zn);

    /* Cut inside the deflate data, and inside the 8-byte trailer. */
    write_bytes(tmp_path("cut.gz"), z, zn / 2);
    expect_docs_error(tmp_path("cut.gz"), KST_FORMAT_AUTO, KST_ERR_FORMAT,
                      "unexpected end of gzip data", "cut.gz");
    write_bytes(tmp_path("cut_trailer.gz"), z, zn - 3);
    expect_docs_error(tmp_path("cut_trailer.gz"), KST_FORMAT_AUTO, KST_ERR_FORMAT,
                      "unexpected end of gzip data", NULL);
    write_bytes(tmp_path("header_only.gz"), z, 10);
    expect_docs_error(tmp_path("header_only.gz"), KST_FORMAT_AUTO, KST_ERR_FORMAT,
                      "unexpected end of gzip data", NULL);

    /* A damaged CRC: zlib checks the trailer. */
    unsigned char *bad = malloc(zn + 16);
    memcpy(bad, z, zn);
    bad[zn - 8] ^= 0xff;
    write_bytes(tmp_path("crc.gz"), bad, zn);
    expect_docs_error(tmp_path("crc.gz"), KST_FORMAT_AUTO, KST_ERR_FORMAT, "invalid gzip data",
                      "incorrect data check");

    /* Bytes after the last member that are not another member. */
    memcpy(bad, z, zn);
    memcpy(bad + zn, "garbage!", 8);
    write_bytes(tmp_path("trailing.gz"), bad, zn + 8);
    expect_docs_error(tmp_path("trailing.gz"), KST_FORMAT_AUTO, KST_ERR_FORMAT,
                      "is not gzip", "member 1");
    free(bad);
    free(z);
    free(data);
}

/* ---------------------------------------------------------------------------------------------
 * HTTP (127.0.0.1 only)
 * ------------------------------------------------------------------------------------------- */

static void test_http_records(void **state) {
    assert_int_equal(assert_same_docs(FX "/docs.tsv", url("/f/docs.tsv")), 5);
    assert_int_equal(assert_same_docs(FX "/beir.jsonl", url("/ce/f/beir.jsonl")), 4);
    assert_int_equal(assert_same_docs(FX "/docs.tsv", url("/f/docs.tsv.gz")), 5);
    assert_int_equal(assert_same_docs(FX "/docs_title.tsv", url("/chunked/f/docs_title_concat.tsv.gz")), 3);
    assert_int_equal(assert_same_docs(FX "/pyserini.jsonl", url("/redirect/f/pyserini.jsonl")), 2);
    assert_int_equal(assert_same_docs(FX "/crlf.tsv", url("/chunked/ce/f/crlf.tsv")), 3);

    kst_error err = {0};
    kst_stream *s = NULL;
    assert_ok(kst_stream_open(url("/f/docs.tsv"), &s, &err), &err);
    assert_string_equal(kst_stream_name(s), url("/f/docs.tsv"));
    const char *line;
    size_t len;
    do assert_ok(kst_stream_getline(s, &line, &len, &err), &err);
    while (line);
    assert_int_equal(kst_stream_bytes_total(s), 124);
    assert_int_equal(kst_stream_bytes_read(s), 124);
    kst_stream_close(s);

    size_t n;
    uint64_t h;
    assert_ok(read_queries(url("/ce/f/queries.jsonl"), KST_FORMAT_AUTO, &n, &h, &err), &err);
    assert_int_equal(n, 2);

    /* The whole SciFact corpus, streamed in small chunks through the paused transfer. */
    const char *corpus = shared_path("beir-scifact/corpus.jsonl");
    if (access(corpus, R_OK) != 0) skip_because("%s is not readable", corpus);
    char plain[4096];
    snprintf(plain, sizeof plain, "%s", corpus);
    assert_int_equal(assert_same_docs(plain, url("/chunked/s/beir-scifact/corpus.jsonl")), 5183);
    assert_int_equal(assert_same_docs(plain, url("/ce/s/beir-scifact/corpus.jsonl")), 5183);

    /* Closing part-way ends the transfer cleanly. */
    kst_docs *r = NULL;
    kst_doc d;
    assert_ok(kst_docs_open(url("/s/beir-scifact/corpus.jsonl"), KST_FORMAT_AUTO, &r, &err), &err);
    assert_ok(kst_docs_next(r, &d, &err), &err);
    assert_field(d.id, d.id_len, "4983");
    kst_docs_close(r);
}

static void test_http_errors(void **state) {
    kst_error err = {0};
    kst_stream *s = (kst_stream *)1;
    const char *u = url("/f/no-such-file.tsv");
    assert_int_equal(kst_stream_open(u, &s, &err), KST_ERR_IO);
    assert_null(s);
    assert_msg_has(err.msg, u);
    assert_msg_has(err.msg, "HTTP status 404");
    expect_docs_error(url("/redirect/f/missing.tsv"), KST_FORMAT_AUTO, KST_ERR_IO,
                      "HTTP status 404", "redirected to");

    /* The server promises the whole body and closes after half. */
    const char *corpus = shared_path("beir-scifact/corpus.jsonl");
    if (access(corpus, R_OK) == 0) {
        expect_docs_error(url("/cut/s/beir-scifact/corpus.jsonl"), KST_FORMAT_AUTO, KST_ERR_IO,
                          url("/cut/s/beir-scifact/corpus.jsonl"), NULL);
        expect_docs_error(url("/chunked/cut/s/beir-scifact/corpus.jsonl"), KST_FORMAT_AUTO,
                          KST_ERR_IO, "/chunked/cut/", NULL);
    }
    /* A complete response whose gzip content is cut: the gzip layer notices. */
    size_t n, zn;
    unsigned char *data = slurp(FX "/docs_title.tsv", &n);
    unsigned char *z = gzip_bytes(data, n, 6, &zn);
    write_bytes(tmp_path("web_cut.gz"), z, zn - 5);
    free(z);
    free(data);
    expect_docs_error(url("/t/web_cut.gz"), KST_FORMAT_AUTO, KST_ERR_FORMAT,
                      "unexpected end of gzip data", "/t/web_cut.gz");

    /* Nothing listens on this port (the listener was closed at once). */
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof a;
    assert_int_equal(bind(fd, (struct sockaddr *)&a, sizeof a), 0);
    assert_int_equal(getsockname(fd, (struct sockaddr *)&a, &len), 0);
    close(fd);
    char dead[128];
    snprintf(dead, sizeof dead, "http://127.0.0.1:%d/x.tsv", ntohs(a.sin_port));
    assert_int_equal(kst_stream_open(dead, &s, &err), KST_ERR_IO);
    assert_msg_has(err.msg, dead);
}

/* ---------------------------------------------------------------------------------------------
 * Bad inputs
 * ------------------------------------------------------------------------------------------- */

static void test_bad_inputs(void **state) {
    expect_docs_error(FX "/bad_json_line3.jsonl", KST_FORMAT_AUTO, KST_ERR_FORMAT,
                      "bad_json_line3.jsonl: line 3, column", "invalid JSON");
    expect_docs_error(FX "/missing_id.jsonl", KST_FORMAT_AUTO, KST_ERR_FORMAT,
                      "missing_id.jsonl: line 2", "missing \"_id\"");
    expect_docs_error(FX "/id_number.jsonl", KST_FORMAT_AUTO, KST_ERR_FORMAT, "line 2",
                      "\"_id\" must be a string, found a number");
    expect_docs_error(FX "/empty_id.jsonl", KST_FORMAT_AUTO, KST_ERR_FORMAT, "line 1",
                      "\"_id\" is empty");
    expect_docs_error(FX "/text_array.jsonl", KST_FORMAT_AUTO, KST_ERR_FORMAT, "line 1",
                      "\"text\" must be a string, found an array");
    expect_docs_error(FX "/meta_string.jsonl", KST_FORMAT_AUTO, KST_ERR_FORMAT, "line 1",
                      "\"metadata\" must be an object, found a string");
    expect_docs_error(FX "/not_object.jsonl", KST_FORMAT_AUTO, KST_ERR_FORMAT, "line 2",
                      "expected a JSON object, found an array");
    expect_docs_error(FX "/unknown_keys.jsonl", KST_FORMAT_AUTO, KST_ERR_FORMAT, "line 1",
                      "neither \"_id\" (BEIR corpus) nor \"id\" and \"contents\" (Pyserini)");
    expect_docs_error(FX "/one_column.tsv", KST_FORMAT_AUTO, KST_ERR_FORMAT,
                      "one_column.tsv: line 1", "expected 2 or 3 tab-separated columns");
    expect_docs_error(FX "/four_columns.tsv", KST_FORMAT_AUTO, KST_ERR_FORMAT, "line 1", "found 4");
    expect_docs_error(FX "/column_mismatch.tsv", KST_FORMAT_AUTO, KST_ERR_FORMAT,
                      "line 2: expected 2 tab-separated columns (id, text) as on line 1", "found 3");
    expect_docs_error(FX "/bad_utf8_id.tsv", KST_FORMAT_AUTO, KST_ERR_FORMAT, "line 2",
                      "is not valid UTF-8 (byte 4 of the id)");
    expect_docs_error(FX "/space_id.tsv", KST_FORMAT_AUTO, KST_ERR_FORMAT, "line 1",
                      "white space or a control character");

    /* An overlong line, with the limit set on the reader's stream. */
    kst_error err = {0};
    kst_docs *r = NULL;
    kst_doc d;
    assert_ok(kst_docs_open(FX "/docs.tsv", KST_FORMAT_TSV, &r, &err), &err);
    kst_stream_set_max_line(kst_docs_stream(r), 25);
    assert_ok(kst_docs_next(r, &d, &err), &err);
    assert_int_equal(kst_docs_next(r, &d, &err), KST_ERR_FORMAT);
    assert_null(d.id);
    assert_msg_has(err.msg, "docs.tsv: line 2 is longer than 25 bytes");
    kst_error again = {0};
    assert_int_equal(kst_docs_next(r, &d, &again), KST_ERR_FORMAT); /* sticky */
    assert_string_equal(again.msg, err.msg);
    kst_docs_close(r);

    /* Invalid UTF-8 in an id spelled as a JSON escape is caught too (lone surrogates are
     * rejected by the JSON parser itself). */
    write_bytes(tmp_path("c1.jsonl"), "{\"_id\": \"a\\u0001b\", \"text\": \"x\"}\n", 34);
    expect_docs_error(tmp_path("c1.jsonl"), KST_FORMAT_AUTO, KST_ERR_FORMAT, "line 1",
                      "control character (byte 2 of the id)");
    write_bytes(tmp_path("c2.jsonl"), "{\"_id\": \"\\ud800\", \"text\": \"x\"}\n", 32);
    expect_docs_error(tmp_path("c2.jsonl"), KST_FORMAT_AUTO, KST_ERR_FORMAT, "line 1",
                      "invalid JSON");
}

/* ---------------------------------------------------------------------------------------------
 * Allocation failures: every failing allocation gives KST_ERR_NOMEM and leaks nothing (ASan).
 * ------------------------------------------------------------------------------------------- */

static void alloc_loop(const char *path, int queries, size_t want) {
    for (long fail_at = 1;; fail_at++) {
        kst_error err = {0};
        size_t n;
        uint64_t h;
        kst_mem_fail_after(fail_at);
        int rc = queries ? read_queries(path, KST_FORMAT_AUTO, &n, &h, &err)
                         : read_docs(path, KST_FORMAT_AUTO, &n, &h, &err);
        long made = kst_mem_fail_after(0);
        if (rc == KST_OK) {
            assert_int_equal(n, want);
            if (made < fail_at) break; /* no allocation failed: done */
            continue; /* a failed allocation that did not matter */
        }
        if (rc != KST_ERR_NOMEM)
            fail_msg("%s, allocation %ld failing: %s: %s", path, fail_at, kst_status_name(rc), err.msg);
        if (fail_at > 100000) fail_msg("%s: allocation loop does not end", path);
    }
}

static void test_alloc_failures(void **state) {
    alloc_loop(FX "/docs.tsv", 0, 5);
    alloc_loop(FX "/docs_title.tsv", 0, 3);
    alloc_loop(FX "/beir.jsonl", 0, 4);
    alloc_loop(FX "/pyserini.jsonl", 0, 2);
    alloc_loop(FX "/docs_title_concat.tsv.gz", 0, 3);
    alloc_loop(FX "/queries.jsonl", 1, 2);
    alloc_loop(FX "/queries.tsv", 1, 2);
    alloc_loop(url("/ce/f/beir.jsonl"), 0, 4);
    alloc_loop(url("/f/docs.tsv"), 0, 5);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_stream_line_ends),
        cmocka_unit_test(test_stream_many_lines),
        cmocka_unit_test(test_stream_max_line),
        cmocka_unit_test(test_stream_default_limit),
        cmocka_unit_test(test_stream_stdin),
        cmocka_unit_test(test_stream_open_errors),
        cmocka_unit_test(test_scifact_corpus),
        cmocka_unit_test(test_scifact_queries),
        cmocka_unit_test(test_tsv_docs),
        cmocka_unit_test(test_jsonl_docs),
        cmocka_unit_test(test_queries),
        cmocka_unit_test(test_format_override),
        cmocka_unit_test(test_gzip_same_records),
        cmocka_unit_test(test_gzip_bad),
        cmocka_unit_test(test_http_records),
        cmocka_unit_test(test_http_errors),
        cmocka_unit_test(test_bad_inputs),
        cmocka_unit_test(test_alloc_failures),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
