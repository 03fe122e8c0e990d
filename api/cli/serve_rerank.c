/* serve_rerank.c - `kestrel serve-rerank`: a cross-encoder behind text-embeddings-inference's
 * /rerank JSON API (HTTP/1.1 with keep-alive, one connection at a time), so `kestrel teach
 * --teacher-url` (or any TEI client) can use a Kestrel model on another machine. */
#include <arpa/inet.h>
#include <cjson/cJSON.h>
#include <errno.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

#include "cli.h"


static const char *HELP =
    "usage: kestrel serve-rerank --model CROSS_DIR [--port N] [--host ADDR] [--max-len N]\n"
    "         [--batch-size N] [--threads N]\n"
    "\n"
    "Serves the cross-encoder at CROSS_DIR over HTTP with text-embeddings-inference's reranking API:\n"
    "  POST /rerank  {\"query\": Q, \"texts\": [T0, T1, ...], \"raw_scores\": false, \"truncate\": true}\n"
    "       -> 200 [{\"index\": i, \"score\": s}, ...] sorted by score, highest first; the score is\n"
    "          sigmoid(logit), or the logit itself with \"raw_scores\": true\n"
    "  GET /health -> 200\n"
    "A request that is not that JSON gets 422 with {\"error\": ..., \"error_type\": \"Validation\"}.\n"
    "Pairs longer than the model's length are always truncated. One connection is served at a time\n"
    "(kept alive across requests); every request is scored with all the threads.\n"
    "Prints \"listening on http://HOST:PORT\" once ready (--port 0 picks a free port). Stops on\n"
    "SIGINT/SIGTERM.\n"
    "\n"
    "  --host ADDR     IPv4 address to bind (127.0.0.1; 0.0.0.0 for every interface)\n"
    "  --port N        TCP port (8080)\n";

static volatile sig_atomic_t stopping = 0;
static void on_signal(int sig) { stopping = sig; }

#define MAX_HEADER (64 * 1024)
#define MAX_BODY ((size_t)256 << 20)

/* A connection's input buffer. */
typedef struct conn {
    int fd;
    char *buf;
    size_t len, cap;
} conn;

static int fill(conn *c) {
    if (c->len + 65536 > c->cap) {
        size_t nc = c->cap ? c->cap * 2 : 131072;
        char *b = realloc(c->buf, nc);
        if (!b) return -1;
        c->buf = b, c->cap = nc;
    }
    for (;;) {
        ssize_t r = recv(c->fd, c->buf + c->len, c->cap - c->len - 1, 0);
        if (r < 0 && errno == EINTR) {
            if (stopping) return -1;
            continue;
        }
        if (r <= 0) return -1;
        c->len += (size_t)r;
        c->buf[c->len] = '\0';
        return 0;
    }
}

static int send_all(int fd, const char *p, size_t n) {
    while (n > 0) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return -1;
        p += w, n -= (size_t)w;
    }
    return 0;
}

static int respond(int fd, int status, const char *reason, const char *body, int keep) {
    char head[256];
    size_t n = body ? strlen(body) : 0;
    int h = snprintf(head, sizeof head,
                     "HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %zu\r\nConnection: %s\r\n\r\n",
                     status, reason, n, keep ? "keep-alive" : "close");
    if (send_all(fd, head, (size_t)h) != 0) return -1;
    return n ? send_all(fd, body, n) : 0;
}

static int respond_error(int fd, int status, const char *reason, const char *msg, int keep) {
    cJSON *j = cJSON_CreateObject();
    cJSON_AddStringToObject(j, "error", msg);
    cJSON_AddStringToObject(j, "error_type", status == 422 ? "Validation" : "Backend");
    char *s = cJSON_PrintUnformatted(j);
    int rc = respond(fd, status, reason, s, keep);
    cJSON_free(s);
    cJSON_Delete(j);
    return rc;
}

typedef struct ranked {
    size_t index;
    float score;
} ranked;

static int by_score(const void *a, const void *b) {
    const ranked *x = a, *y = b;
    if (x->score != y->score) return x->score > y->score ? -1 : 1;
    return x->index < y->index ? -1 : x->index > y->index;
}

/* Handles one /rerank body; writes the response. */
static int rerank(kst_model *m, const kst_encode_opts *eo, int fd, const char *body, size_t len, int keep) {
    cJSON *j = cJSON_ParseWithLength(body, len);
    const cJSON *q = j ? cJSON_GetObjectItemCaseSensitive(j, "query") : NULL;
    const cJSON *texts = j ? cJSON_GetObjectItemCaseSensitive(j, "texts") : NULL;
    const cJSON *raw = j ? cJSON_GetObjectItemCaseSensitive(j, "raw_scores") : NULL;
    int rc = 0;
    if (!cJSON_IsString(q) || !cJSON_IsArray(texts) || cJSON_GetArraySize(texts) == 0) {
        rc = respond_error(fd, 422, "Unprocessable Entity",
                           "expected {\"query\": string, \"texts\": [string, ...]} with at least one text", keep);
        cJSON_Delete(j);
        return rc;
    }
    size_t n = (size_t)cJSON_GetArraySize(texts), k = 0;
    const char **qs = malloc(n * sizeof *qs), **ps = malloc(n * sizeof *ps);
    float *s = malloc(n * sizeof *s);
    ranked *r = malloc(n * sizeof *r);
    if (!qs || !ps || !s || !r) {
        rc = respond_error(fd, 500, "Internal Server Error", "out of memory", 0);
        goto done;
    }
    const cJSON *t;
    cJSON_ArrayForEach(t, texts) {
        if (!cJSON_IsString(t)) {
            rc = respond_error(fd, 422, "Unprocessable Entity", "every entry of \"texts\" must be a string", keep);
            goto done;
        }
        qs[k] = q->valuestring;
        ps[k] = t->valuestring;
        k++;
    }
    kst_error err;
    if (kst_model_score(m, qs, NULL, ps, NULL, n, eo, s, &err) != KST_OK) {
        rc = respond_error(fd, 500, "Internal Server Error", err.msg, keep);
        goto done;
    }
    int raw_scores = cJSON_IsTrue(raw);
    for (size_t i = 0; i < n; i++) {
        r[i].index = i;
        r[i].score = raw_scores ? s[i] : (float)(1.0 / (1.0 + exp(-(double)s[i])));
    }
    qsort(r, n, sizeof *r, by_score);
    /* printed by hand: %.9g keeps every float32 bit, cJSON's doubles would add noise digits */
    size_t cap = 48 * n + 16, at = 0;
    char *out = malloc(cap);
    if (!out) {
        rc = respond_error(fd, 500, "Internal Server Error", "out of memory", 0);
        goto done;
    }
    out[at++] = '[';
    for (size_t i = 0; i < n; i++)
        at += (size_t)snprintf(out + at, cap - at, "%s{\"index\":%zu,\"score\":%.9g}", i ? "," : "", r[i].index,
                               (double)r[i].score);
    out[at++] = ']';
    out[at] = '\0';
    rc = respond(fd, 200, "OK", out, keep);
    free(out);
done:
    free(qs), free(ps), free(s), free(r);
    cJSON_Delete(j);
    return rc;
}

/* Serves requests on one connection until it closes. */
static void serve_conn(kst_model *m, const kst_encode_opts *eo, int fd) {
    conn c = {fd, NULL, 0, 0};
    while (!stopping) {
        char *end;
        while (!(end = c.buf ? strstr(c.buf, "\r\n\r\n") : NULL)) {
            if (c.len > MAX_HEADER || fill(&c) != 0) goto out;
        }
        size_t hlen = (size_t)(end - c.buf) + 4;
        char method[16] = "", path[256] = "", version[16] = "";
        if (sscanf(c.buf, "%15s %255s %15s", method, path, version) != 3) {
            respond_error(fd, 400, "Bad Request", "malformed request line", 0);
            goto out;
        }
        size_t body_len = 0;
        int keep = strcmp(version, "HTTP/1.1") == 0;
        for (char *h = strstr(c.buf, "\r\n") + 2; h < end; h = strstr(h, "\r\n") + 2) {
            if (strncasecmp(h, "Content-Length:", 15) == 0) body_len = strtoull(h + 15, NULL, 10);
            else if (strncasecmp(h, "Connection:", 11) == 0) {
                const char *v = h + 11;
                while (*v == ' ') v++;
                if (strncasecmp(v, "close", 5) == 0) keep = 0;
                else if (strncasecmp(v, "keep-alive", 10) == 0) keep = 1;
            }
        }
        if (body_len > MAX_BODY) {
            respond_error(fd, 413, "Payload Too Large", "request body too large", 0);
            goto out;
        }
        while (c.len < hlen + body_len)
            if (fill(&c) != 0) goto out;
        const char *body = c.buf + hlen;
        int rc;
        if (strcmp(method, "POST") == 0 && strcmp(path, "/rerank") == 0) rc = rerank(m, eo, fd, body, body_len, keep);
        else if (strcmp(method, "GET") == 0 && strcmp(path, "/health") == 0) rc = respond(fd, 200, "OK", NULL, keep);
        else rc = respond_error(fd, 404, "Not Found", "unknown route (POST /rerank, GET /health)", keep);
        if (rc != 0 || !keep) break;
        size_t used = hlen + body_len;
        memmove(c.buf, c.buf + used, c.len - used);
        c.len -= used;
        c.buf[c.len] = '\0';
    }
out:
    free(c.buf);
    close(fd);
}

int cmd_serve_rerank(int argc, char **argv) {
    const char *cmd = "serve-rerank", *host = "127.0.0.1";
    cli_model_args a = {0};
    size_t port = 8080;
    for (int i = 1; i < argc; i++) {
        int r = cli_model_option(&a, argc, argv, &i);
        if (r < 0) return KST_EXIT_USAGE;
        if (r > 0) continue;
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            fputs(HELP, stdout);
            return 0;
        } else if (strcmp(argv[i], "--port") == 0 && i + 1 < argc) {
            if (cli_size_value("--port", argv[++i], &port) != 0) return KST_EXIT_USAGE;
            if (port > 65535) return cli_usage_error(cmd, "--port must be below 65536");
        } else if (strcmp(argv[i], "--host") == 0 && i + 1 < argc) {
            host = argv[++i];
        } else {
            return cli_usage_error(cmd, "unknown option \"%s\"", argv[i]);
        }
    }
    if (!a.model) return cli_usage_error(cmd, "--model DIR is required");
    struct sockaddr_in addr;
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_port = htons((unsigned short)port);
    if (inet_pton(AF_INET, host, &addr.sin_addr) != 1)
        return cli_usage_error(cmd, "--host expects an IPv4 address, got \"%s\"", host);
    int code = 0;
    a.kind = KST_MODEL_CROSS;
    kst_model *m = cli_open_model(&a, &code);
    if (!m) return code;
    kst_encode_opts eo = kst_encode_opts_default();
    eo.max_len = a.max_len;
    if (a.batch_size) eo.batch_size = a.batch_size;
    int one = 1, fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) != 0 ||
        bind(fd, (struct sockaddr *)&addr, sizeof addr) != 0 || listen(fd, 16) != 0) {
        fprintf(stderr, "kestrel serve-rerank: cannot listen on %s:%zu: %s\n", host, port, strerror(errno));
        if (fd >= 0) close(fd);
        kst_model_close(m);
        return -KST_ERR_IO;
    }
    socklen_t al = sizeof addr;
    getsockname(fd, (struct sockaddr *)&addr, &al);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal; /* no SA_RESTART: accept() and recv() return EINTR */
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    printf("listening on http://%s:%u\n", host, (unsigned)ntohs(addr.sin_port));
    fflush(stdout);
    while (!stopping) {
        int cfd = accept(fd, NULL, NULL);
        if (cfd < 0) {
            if (errno == EINTR || errno == ECONNABORTED) continue;
            fprintf(stderr, "kestrel serve-rerank: accept: %s\n", strerror(errno));
            break;
        }
        setsockopt(cfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        serve_conn(m, &eo, cfd);
    }
    close(fd);
    kst_model_close(m);
    return 0;
}
