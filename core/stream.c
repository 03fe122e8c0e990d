/* stream.c - line reading over files, stdin, gzip (zlib) and http(s) (libcurl multi, paused when
 * the consumer falls behind so memory stays bounded). */
#include "stream.h"

#include <curl/curl.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include "check.h"
#include "mem.h"
#include "progress.h"

/* ---------------------------------------------------------------------------------------------
 * Types
 * ------------------------------------------------------------------------------------------- */

enum { RAW_CAP = 256 * 1024, LINE_CHUNK = 64 * 1024 };
/* An HTTP transfer that delivers nothing for this long while we wait on it is an error. Time
 * spent by the consumer between reads does not count (the transfer is paused then). */
#define HTTP_STALL_SECONDS 300.0

enum source_kind { SRC_FD, SRC_HTTP };

struct kst_stream {
    char *name;
    enum source_kind kind;
    int fd, own_fd;

    /* HTTP: the write callback appends the body to raw[] and pauses when it does not fit. */
    CURLM *multi;
    CURL *easy;
    int paused, http_done, cb_nomem;
    CURLcode http_result;
    char curl_msg[CURL_ERROR_SIZE];

    /* Source bytes not yet decoded: raw[raw_pos, raw_len). */
    unsigned char *raw;
    size_t raw_pos, raw_len, raw_cap;
    int raw_eof;

    /* gzip: one z_stream reused for every member. */
    int gzip, z_ready, member_open;
    unsigned members;
    z_stream z;

    /* Decoded bytes: buf[start, end) is unread; scan is where the search for "\n" resumes. */
    char *buf;
    size_t cap, start, end, scan;
    int eof;

    size_t lineno, max_line;
    uint64_t bytes_read, bytes_total;
    kst_error failure; /* sticky: code != KST_OK after the first failure */
};

/* ---------------------------------------------------------------------------------------------
 * Source: file descriptor or HTTP
 * ------------------------------------------------------------------------------------------- */

static pthread_once_t curl_once = PTHREAD_ONCE_INIT;
static CURLcode curl_init_result = CURLE_OK;

static void curl_global_setup(void) { curl_init_result = curl_global_init(CURL_GLOBAL_DEFAULT); }

static int is_url(const char *path) {
    return strncasecmp(path, "http://", 7) == 0 || strncasecmp(path, "https://", 8) == 0;
}

/* "scheme://..." (RFC 3986 3.1) that is not http(s): named in the error for a missing file. */
static int looks_like_url(const char *path) {
    const char *p = path;
    if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z'))) return 0;
    while ((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') ||
           *p == '+' || *p == '-' || *p == '.')
        p++;
    return strncmp(p, "://", 3) == 0;
}

static void raw_compact(kst_stream *s) {
    if (s->raw_pos == 0) return;
    memmove(s->raw, s->raw + s->raw_pos, s->raw_len - s->raw_pos);
    s->raw_len -= s->raw_pos;
    s->raw_pos = 0;
}

static size_t http_write(char *data, size_t size, size_t nmemb, void *user) {
    kst_stream *s = user;
    size_t n = size * nmemb;
    if (s->raw_cap - s->raw_len < n) raw_compact(s);
    if (s->raw_cap - s->raw_len < n) {
        if (s->raw_len > 0) {
            /* No room until the consumer catches up: curl keeps the data and stops reading the
             * socket, so TCP flow control holds the sender back. */
            s->paused = 1;
            return CURL_WRITEFUNC_PAUSE;
        }
        /* Empty yet too small: a chunk bigger than RAW_CAP (curl's are 16 KiB); make room. */
        void *p = s->raw;
        if (kst_realloc(&p, n, 1, "HTTP buffer", NULL) != KST_OK) {
            s->cb_nomem = 1;
            return 0; /* aborts the transfer with CURLE_WRITE_ERROR */
        }
        s->raw = p;
        s->raw_cap = n;
    }
    memcpy(s->raw + s->raw_len, data, n);
    s->raw_len += n;
    s->bytes_read += n;
    return n;
}

static int http_error(kst_stream *s, kst_error *err) {
    if (s->cb_nomem) return kst_fail(err, KST_ERR_NOMEM, "%s: out of memory while downloading", s->name);
    if (s->http_result == CURLE_HTTP_RETURNED_ERROR) {
        long status = 0;
        curl_easy_getinfo(s->easy, CURLINFO_RESPONSE_CODE, &status);
        const char *eff = NULL;
        curl_easy_getinfo(s->easy, CURLINFO_EFFECTIVE_URL, &eff);
        if (eff && strcmp(eff, s->name) != 0)
            return kst_fail(err, KST_ERR_IO, "%s: HTTP status %ld (redirected to %s)", s->name,
                            status, eff);
        return kst_fail(err, KST_ERR_IO, "%s: HTTP status %ld", s->name, status);
    }
    return kst_fail(err, KST_ERR_IO, "%s: %s", s->name,
                    s->curl_msg[0] ? s->curl_msg : curl_easy_strerror(s->http_result));
}

/* Pumps the transfer until raw[] grows or the transfer ends. */
static int http_fill(kst_stream *s, kst_error *err) {
    size_t before = s->raw_len;
    double idle_since = kst_now();
    while (s->raw_len == before) {
        if (s->paused) {
            s->paused = 0;
            CURLcode cr = curl_easy_pause(s->easy, CURLPAUSE_CONT); /* may deliver at once */
            if (cr != CURLE_OK)
                return kst_fail(err, KST_ERR_IO, "%s: cannot resume transfer: %s", s->name,
                                curl_easy_strerror(cr));
            continue;
        }
        int running = 0;
        CURLMcode mc = curl_multi_perform(s->multi, &running);
        if (mc != CURLM_OK)
            return kst_fail(err, KST_ERR_IO, "%s: %s", s->name, curl_multi_strerror(mc));
        CURLMsg *m;
        int left;
        while ((m = curl_multi_info_read(s->multi, &left)))
            if (m->msg == CURLMSG_DONE) {
                s->http_done = 1;
                s->http_result = m->data.result;
            }
        if (s->raw_len != before) break;
        if (s->http_done) {
            if (s->http_result != CURLE_OK || s->cb_nomem) return http_error(s, err);
            s->raw_eof = 1;
            break;
        }
        if (s->paused) continue;
        if (kst_now() - idle_since > HTTP_STALL_SECONDS)
            return kst_fail(err, KST_ERR_IO, "%s: no data for %.0f seconds", s->name,
                            HTTP_STALL_SECONDS);
        mc = curl_multi_poll(s->multi, NULL, 0, 1000, NULL);
        if (mc != CURLM_OK)
            return kst_fail(err, KST_ERR_IO, "%s: %s", s->name, curl_multi_strerror(mc));
    }
    return KST_OK;
}

/* Appends source bytes to raw[] (after compacting it), or sets raw_eof. */
static int raw_fill(kst_stream *s, kst_error *err) {
    if (s->raw_eof) return KST_OK;
    raw_compact(s);
    if (s->kind == SRC_HTTP) return http_fill(s, err);
    ssize_t n;
    do n = read(s->fd, s->raw + s->raw_len, s->raw_cap - s->raw_len);
    while (n < 0 && errno == EINTR);
    if (n < 0) return kst_fail(err, KST_ERR_IO, "%s: read failed: %s", s->name, strerror(errno));
    if (n == 0) s->raw_eof = 1;
    s->raw_len += (size_t)n;
    s->bytes_read += (uint64_t)n;
    return KST_OK;
}

static int http_open(kst_stream *s, const char *url, kst_error *err) {
    pthread_once(&curl_once, curl_global_setup);
    if (curl_init_result != CURLE_OK)
        return kst_fail(err, KST_ERR_IO, "%s: cannot initialise libcurl: %s", url,
                        curl_easy_strerror(curl_init_result));
    s->kind = SRC_HTTP;
    s->easy = curl_easy_init();
    s->multi = curl_multi_init();
    if (!s->easy || !s->multi)
        return kst_fail(err, KST_ERR_NOMEM, "%s: cannot create a libcurl handle", url);
    CURL *e = s->easy;
    int bad = 0;
    bad |= curl_easy_setopt(e, CURLOPT_URL, url) != CURLE_OK;
    bad |= curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "http,https") != CURLE_OK;
    bad |= curl_easy_setopt(e, CURLOPT_REDIR_PROTOCOLS_STR, "http,https") != CURLE_OK;
    bad |= curl_easy_setopt(e, CURLOPT_FOLLOWLOCATION, 1L) != CURLE_OK;
    bad |= curl_easy_setopt(e, CURLOPT_MAXREDIRS, 10L) != CURLE_OK;
    bad |= curl_easy_setopt(e, CURLOPT_FAILONERROR, 1L) != CURLE_OK;
    /* Gzip is recognised by its magic bytes after the transfer, as for files. */
    bad |= curl_easy_setopt(e, CURLOPT_HTTP_CONTENT_DECODING, 0L) != CURLE_OK;
    bad |= curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT, 30L) != CURLE_OK;
    bad |= curl_easy_setopt(e, CURLOPT_USERAGENT, "kestrel") != CURLE_OK;
    bad |= curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L) != CURLE_OK;
    bad |= curl_easy_setopt(e, CURLOPT_ERRORBUFFER, s->curl_msg) != CURLE_OK;
    bad |= curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, http_write) != CURLE_OK;
    bad |= curl_easy_setopt(e, CURLOPT_WRITEDATA, s) != CURLE_OK;
    if (bad) return kst_fail(err, KST_ERR_NOMEM, "%s: cannot set libcurl options", url);
    if (curl_multi_add_handle(s->multi, e) != CURLM_OK)
        return kst_fail(err, KST_ERR_NOMEM, "%s: cannot start the transfer", url);
    return KST_OK;
}

static int fd_open(kst_stream *s, const char *path, kst_error *err) {
    s->kind = SRC_FD;
    if (strcmp(path, "-") == 0) {
        s->fd = 0;
    } else {
        s->fd = open(path, O_RDONLY | O_CLOEXEC);
        if (s->fd < 0 && errno == ENOENT && looks_like_url(path))
            return kst_fail(err, KST_ERR_UNSUPPORTED,
                            "%s: not a file, and only http:// and https:// URLs are supported", path);
        if (s->fd < 0)
            return kst_fail(err, errno == ENOENT ? KST_ERR_NOTFOUND : KST_ERR_IO,
                            "%s: cannot open: %s", path, strerror(errno));
        s->own_fd = 1;
    }
    struct stat st;
    if (fstat(s->fd, &st) != 0)
        return kst_fail(err, KST_ERR_IO, "%s: cannot stat: %s", s->name, strerror(errno));
    if (S_ISDIR(st.st_mode)) return kst_fail(err, KST_ERR_IO, "%s: is a directory", s->name);
    if (S_ISREG(st.st_mode)) {
        off_t at = lseek(s->fd, 0, SEEK_CUR); /* stdin may be a file read part-way */
        s->bytes_total = (uint64_t)st.st_size - (at > 0 ? (uint64_t)at : 0);
    }
    return KST_OK;
}

/* ---------------------------------------------------------------------------------------------
 * Decoding: copy or inflate raw[] into buf[]
 * ------------------------------------------------------------------------------------------- */

static voidpf z_alloc(voidpf opaque, uInt items, uInt size) {
    return kst_malloc(items, size, "gzip state", NULL);
}
static void z_free(voidpf opaque, voidpf p) { kst_free(p); }

/* Offset in the source of the next raw byte not yet decoded, for messages. */
static unsigned long long raw_offset(const kst_stream *s) {
    return (unsigned long long)(s->bytes_read - (s->raw_len - s->raw_pos));
}

/* Adds at least one decoded byte to buf[end, cap-1) or sets eof. Needs cap - end > 1. */
static int decode_more(kst_stream *s, kst_error *err) {
    size_t room = s->cap - s->end - 1; /* one byte kept for the NUL after a last line */
    for (;;) {
        if (s->raw_pos == s->raw_len) {
            int rc = raw_fill(s, err);
            if (rc != KST_OK) return rc;
        }
        if (s->raw_pos == s->raw_len) { /* source exhausted */
            if (s->gzip && s->member_open)
                return kst_fail(err, KST_ERR_FORMAT,
                                "%s: unexpected end of gzip data after %llu bytes (truncated file?)",
                                s->name, raw_offset(s));
            s->eof = 1;
            return KST_OK;
        }
        size_t have = s->raw_len - s->raw_pos;
        if (!s->gzip) {
            size_t n = have < room ? have : room;
            memcpy(s->buf + s->end, s->raw + s->raw_pos, n);
            s->raw_pos += n;
            s->end += n;
            return KST_OK;
        }
        if (!s->member_open) { /* RFC 1952 2.2: a gzip file is a series of members */
            if (inflateReset(&s->z) != Z_OK)
                return kst_fail(err, KST_ERR_INTERNAL, "%s: inflateReset failed", s->name);
            s->member_open = 1;
        }
        unsigned long long at = raw_offset(s);
        uInt in = have > UINT32_MAX ? UINT32_MAX : (uInt)have;
        uInt out = room > UINT32_MAX ? UINT32_MAX : (uInt)room;
        s->z.next_in = s->raw + s->raw_pos;
        s->z.avail_in = in;
        s->z.next_out = (unsigned char *)s->buf + s->end;
        s->z.avail_out = out;
        int zr = inflate(&s->z, Z_NO_FLUSH);
        s->raw_pos += in - s->z.avail_in;
        size_t produced = out - s->z.avail_out;
        s->end += produced;
        if (zr == Z_STREAM_END) {
            s->member_open = 0;
            s->members++;
        } else if (zr == Z_MEM_ERROR) {
            return kst_fail(err, KST_ERR_NOMEM, "%s: out of memory while inflating gzip data",
                            s->name);
        } else if (zr != Z_OK && zr != Z_BUF_ERROR) {
            if (s->members > 0 && s->z.total_out == 0)
                return kst_fail(err, KST_ERR_FORMAT,
                                "%s: data after the end of gzip member %u (byte %llu) is not gzip",
                                s->name, s->members, at);
            return kst_fail(err, KST_ERR_FORMAT, "%s: invalid gzip data near byte %llu: %s",
                            s->name, at, s->z.msg ? s->z.msg : "inflate failed");
        }
        if (produced) return KST_OK;
    }
}

/* ---------------------------------------------------------------------------------------------
 * API
 * ------------------------------------------------------------------------------------------- */

int kst_stream_open(const char *path, kst_stream **out, kst_error *err) {
    *out = NULL;
    if (!path || !*path) return kst_fail(err, KST_ERR_INVALID, "stream: empty path");
    kst_stream *s = kst_calloc(1, sizeof *s, "stream", err);
    if (!s) return KST_ERR_NOMEM;
    s->fd = -1;
    s->max_line = KST_STREAM_MAX_LINE;
    int rc = KST_OK;
    s->name = kst_strndup(strcmp(path, "-") == 0 ? "<stdin>" : path, (size_t)-1, err);
    if (!s->name) {
        rc = KST_ERR_NOMEM;
        goto done;
    }
    s->raw_cap = RAW_CAP;
    s->cap = LINE_CHUNK * 2;
    s->raw = kst_malloc(s->raw_cap, 1, "stream input buffer", err);
    s->buf = s->raw ? kst_malloc(s->cap, 1, "stream line buffer", err) : NULL;
    if (!s->buf) {
        rc = KST_ERR_NOMEM;
        goto done;
    }
    KST_TRY(is_url(path) ? http_open(s, path, err) : fd_open(s, path, err));
    /* Peek at two bytes for the gzip magic (RFC 1952 2.3.1: ID1 = 31, ID2 = 139). */
    while (s->raw_len - s->raw_pos < 2 && !s->raw_eof) KST_TRY(raw_fill(s, err));
    if (s->raw_len - s->raw_pos >= 2 && s->raw[s->raw_pos] == 0x1f && s->raw[s->raw_pos + 1] == 0x8b) {
        s->gzip = 1;
        s->z.zalloc = z_alloc;
        s->z.zfree = z_free;
        int zr = inflateInit2(&s->z, 16 + MAX_WBITS); /* 16: gzip wrapper only */
        if (zr != Z_OK) {
            rc = zr == Z_MEM_ERROR ? kst_fail(err, KST_ERR_NOMEM, "%s: cannot allocate gzip state", s->name)
                                   : kst_fail(err, KST_ERR_INTERNAL, "%s: inflateInit2 failed", s->name);
            goto done;
        }
        s->z_ready = 1;
        s->member_open = 1;
    }
done:
    if (rc != KST_OK) {
        kst_stream_close(s);
        return rc;
    }
    *out = s;
    return KST_OK;
}

void kst_stream_set_max_line(kst_stream *s, size_t max_line) {
    s->max_line = max_line ? max_line : 1;
}

static int overlong(kst_stream *s, kst_error *err) {
    return kst_fail(err, KST_ERR_FORMAT, "%s: line %zu is longer than %zu bytes", s->name,
                    s->lineno + 1, s->max_line);
}

/* Makes room for at least LINE_CHUNK more bytes after the unread ones. */
static int make_room(kst_stream *s, kst_error *err) {
    if (s->start > 0) {
        memmove(s->buf, s->buf + s->start, s->end - s->start);
        s->end -= s->start;
        s->scan -= s->start;
        s->start = 0;
    }
    if (s->cap - s->end > LINE_CHUNK) return KST_OK;
    /* Doubling keeps growth amortised; the cap keeps one overlong line from doubling past it. */
    size_t need = s->end + LINE_CHUNK + 1, limit = s->max_line + LINE_CHUNK + 2;
    size_t cap = s->cap * 2 < need ? need : s->cap * 2;
    if (cap > limit && limit >= need) cap = limit;
    void *p = s->buf;
    int rc = kst_realloc(&p, cap, 1, "stream line buffer", err);
    if (rc != KST_OK) return kst_error_prefix(err, "%s: line %zu", s->name, s->lineno + 1);
    s->buf = p;
    s->cap = cap;
    return KST_OK;
}

static int stream_failed(kst_stream *s, int rc, kst_error *err) {
    if (err) s->failure = *err;
    else kst_fail(&s->failure, rc, "%s: %s", s->name, kst_status_str(rc));
    s->failure.code = rc;
    return rc;
}

int kst_stream_getline(kst_stream *s, const char **line, size_t *len, kst_error *err) {
    *line = NULL;
    *len = 0;
    if (s->failure.code != KST_OK) {
        if (err) *err = s->failure;
        return s->failure.code;
    }
    for (;;) {
        char *nl = memchr(s->buf + s->scan, '\n', s->end - s->scan);
        size_t n;
        if (nl) {
            n = (size_t)(nl - (s->buf + s->start));
        } else if (s->eof) {
            if (s->start == s->end) return KST_OK; /* end of stream */
            n = s->end - s->start;
            nl = s->buf + s->end; /* the spare byte after the data */
        } else {
            if (s->end - s->start > s->max_line + 1) return stream_failed(s, overlong(s, err), err);
            int rc = make_room(s, err);
            if (rc == KST_OK) {
                s->scan = s->end;
                rc = decode_more(s, err);
            }
            if (rc != KST_OK) return stream_failed(s, rc, err);
            continue;
        }
        char *p = s->buf + s->start;
        size_t next = (size_t)(nl - s->buf) + (nl < s->buf + s->end ? 1 : 0);
        if (n > 0 && p[n - 1] == '\r') n--;
        if (n > s->max_line) return stream_failed(s, overlong(s, err), err);
        p[n] = '\0';
        s->start = s->scan = next;
        s->lineno++;
        if (s->lineno == 1 && n >= 3 && memcmp(p, "\xEF\xBB\xBF", 3) == 0) { /* UTF-8 BOM */
            p += 3;
            n -= 3;
        }
        *line = p;
        *len = n;
        return KST_OK;
    }
}

size_t kst_stream_lineno(const kst_stream *s) { return s->lineno; }
const char *kst_stream_name(const kst_stream *s) { return s->name; }
int kst_stream_is_gzip(const kst_stream *s) { return s->gzip; }
uint64_t kst_stream_bytes_read(const kst_stream *s) { return s->bytes_read; }

uint64_t kst_stream_bytes_total(const kst_stream *s) {
    if (s->kind == SRC_HTTP && s->easy) {
        curl_off_t n = -1;
        if (curl_easy_getinfo(s->easy, CURLINFO_CONTENT_LENGTH_DOWNLOAD_T, &n) == CURLE_OK && n > 0)
            return (uint64_t)n;
        return 0;
    }
    return s->bytes_total;
}

void kst_stream_close(kst_stream *s) {
    if (!s) return;
    if (s->multi && s->easy) curl_multi_remove_handle(s->multi, s->easy);
    if (s->easy) curl_easy_cleanup(s->easy);
    if (s->multi) curl_multi_cleanup(s->multi);
    if (s->own_fd && s->fd >= 0) close(s->fd);
    if (s->z_ready) inflateEnd(&s->z);
    kst_free(s->raw);
    kst_free(s->buf);
    kst_free(s->name);
    kst_free(s);
}
