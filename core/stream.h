/* stream.h - sequential line reading from a file, stdin, gzip data or an http(s) URL.
 *
 * One handle reads one source front to back, as lines. The source is picked from the path:
 *   "-"                        standard input (not closed by kst_stream_close);
 *   "http://..." "https://..." streamed with libcurl (redirects followed, HTTP status >= 400 is an
 *                              error naming the URL and the status); memory stays bounded: the
 *                              transfer is paused while the consumer has not taken what arrived;
 *   anything else              a file (a missing "scheme://..." path is KST_ERR_UNSUPPORTED).
 * Whatever the source, data that starts with the gzip magic bytes 1f 8b is inflated with zlib,
 * concatenated members included (RFC 1952 2.2). The name does not matter. A gzip body sent with
 * "Content-Encoding: gzip" is inflated the same way (no Accept-Encoding is sent; curl does not
 * decode). Gzip data that ends inside a member is an error, never a silent end of stream; data
 * after the last member that is not another member is an error too (gzip(1) only warns).
 *
 * Lines: split at "\n"; a "\r" before it is dropped; a last line without "\n" is still a line; a
 * UTF-8 byte-order mark at the very start is dropped. Bytes are passed through unchanged (no
 * UTF-8 check here). A line longer than the limit (KST_STREAM_MAX_LINE by default) is an error
 * naming the source and the line, so a file without newlines cannot take all memory.
 *
 * Errors are sticky: after a failure every later getline returns the same status and message.
 * A handle is used by one thread at a time; distinct handles are independent. */
#ifndef KST_CORE_STREAM_H
#define KST_CORE_STREAM_H

#include <stddef.h>
#include <stdint.h>

#include "error.h"

/* Default longest line, in bytes, without its "\n" / "\r\n". */
#define KST_STREAM_MAX_LINE ((size_t)64 << 20)

typedef struct kst_stream kst_stream;

/* Opens `path` (IN: file path, "-" or an http(s) URL) and reads far enough to know whether it is
 * gzip, so a missing file, an HTTP error status or a bad URL fails here. On success *out (OUT)
 * is a handle to close with kst_stream_close; on failure *out is NULL and err names the path. */
int kst_stream_open(const char *path, kst_stream **out, kst_error *err);

/* Sets the longest accepted line in bytes (at least 1); takes effect from the next getline. */
void kst_stream_set_max_line(kst_stream *s, size_t max_line);

/* Reads the next line. On KST_OK, *line (OUT) points to its `*len` (OUT) bytes without the line
 * end, followed by a NUL (the bytes may themselves hold NULs: *len is what counts); it stays valid
 * until the next getline or close. At the end of the stream it returns KST_OK with *line = NULL
 * and *len = 0 (and keeps doing so). On failure *line is NULL and err says why: KST_ERR_IO (read,
 * network, HTTP status), KST_ERR_FORMAT (bad or truncated gzip, overlong line), KST_ERR_NOMEM. */
int kst_stream_getline(kst_stream *s, const char **line, size_t *len, kst_error *err);

/* Number of the line getline last returned (1-based; 0 before the first). */
size_t kst_stream_lineno(const kst_stream *s);
/* The name used in messages: the path or URL as given, or "<stdin>". Valid until close. */
const char *kst_stream_name(const kst_stream *s);
/* 1 when the data is being inflated from gzip. */
int kst_stream_is_gzip(const kst_stream *s);
/* Bytes taken from the source so far (compressed bytes for gzip), for a progress bar. */
uint64_t kst_stream_bytes_read(const kst_stream *s);
/* Size of the source in the same unit when known (regular file, HTTP Content-Length), else 0. */
uint64_t kst_stream_bytes_total(const kst_stream *s);

/* Closes the source (stdin excepted), ends any transfer and frees the handle; NULL is a no-op. */
void kst_stream_close(kst_stream *s);

#endif
