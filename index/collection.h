/* collection.h - document and query records from TSV, BEIR JSONL or Pyserini JSONL files.
 *
 * Any input core/stream.h opens works: a file, "-", gzip data, an http(s) URL.
 *
 * Documents, one per line:
 *   TSV       id<TAB>text  or  id<TAB>title<TAB>text (MS MARCO collection.tsv). The first record
 *             fixes the column count; every later line must have the same. No quoting or escapes.
 *   BEIR      {"_id": "...", "title": "...", "text": "...", "metadata": {...}} (corpus.jsonl).
 *             "_id" and "text" are required strings; "title" is an optional string; "metadata" an
 *             optional object, handed back as compact JSON text.
 *   Pyserini  {"id": "...", "contents": "..."}; both required strings; no title.
 * Queries, one per line:
 *   TSV       qid<TAB>text (exactly two columns).
 *   BEIR      {"_id": "...", "text": "...", "metadata": {...}} (queries.jsonl); the metadata (in
 *             SciFact, evidence labels) is not part of the query and is not returned.
 * In JSON lines, null counts as absent and other keys are ignored.
 *
 * Detection (KST_FORMAT_AUTO): the first non-empty line decides: a line starting with "{" is JSON,
 * and its keys pick BEIR ("_id") or Pyserini ("id" and "contents"); anything else is TSV. A given
 * format skips detection and every line must then be of that format.
 *
 * Lines that are empty or hold only white space are skipped. Every other malformed line
 * stops the reader with KST_ERR_FORMAT and a message naming the source, the line number and what
 * was expected: invalid JSON (with its column), not an object, a missing or empty id, a value of
 * the wrong type, the wrong number of TSV columns, an id that is not valid UTF-8.
 *
 * Ids must be non-empty, valid UTF-8, and hold no white space or control characters (run and
 * qrels files separate fields by white space). Titles and texts are passed through byte for
 * byte: invalid UTF-8 there is kept, and the tokenizer decodes it as U+FFFD and drops it.
 *
 * A reader is used by one thread at a time. */
#ifndef KST_INDEX_COLLECTION_H
#define KST_INDEX_COLLECTION_H

#include <stddef.h>

#include "core/error.h"
#include "core/stream.h"

typedef enum kst_rec_format {
    KST_FORMAT_AUTO = 0, /* detect from the first non-empty line */
    KST_FORMAT_TSV,
    KST_FORMAT_BEIR,
    KST_FORMAT_PYSERINI, /* documents only */
} kst_rec_format;

/* "auto", "tsv", "beir", "pyserini"; never NULL. */
const char *kst_rec_format_name(kst_rec_format f);
/* Parses a name above (as a CLI --format value) into *out; KST_ERR_INVALID for others. */
int kst_rec_format_parse(const char *name, kst_rec_format *out, kst_error *err);

/* One document. Every string is NUL-terminated and stays valid until the next kst_docs_next or
 * kst_docs_close; the lengths count bytes without the NUL (TSV text may hold NUL bytes). */
typedef struct kst_doc {
    const char *id;
    const char *title;     /* "" when the format has none or the record omits it */
    const char *text;
    const char *meta_json; /* BEIR "metadata" as compact JSON, NULL when absent */
    size_t id_len, title_len, text_len, meta_len;
    size_t line;           /* line number in the source, for later messages */
} kst_doc;

typedef struct kst_docs kst_docs;

/* Opens `path` (any kst_stream_open input) and, for KST_FORMAT_AUTO, reads up to the first
 * non-empty line to detect the format. *out (OUT) is closed with kst_docs_close; NULL on failure.
 * An empty input opens fine and yields no documents. */
int kst_docs_open(const char *path, kst_rec_format format, kst_docs **out, kst_error *err);
/* Reads the next document into *doc (OUT). Returns KST_OK with doc->id set, or KST_OK with
 * doc->id == NULL at the end of the input (then again on every call). On failure doc->id is NULL,
 * err names the source and line, and later calls fail the same way. */
int kst_docs_next(kst_docs *r, kst_doc *doc, kst_error *err);
/* The format in use: as given, as detected, or KST_FORMAT_AUTO for an input with no records. */
kst_rec_format kst_docs_format(const kst_docs *r);
/* The underlying stream, for its name, line number, bytes read and total (progress bars), and
 * kst_stream_set_max_line. Owned by the reader. */
kst_stream *kst_docs_stream(kst_docs *r);
/* Closes the input and frees the reader; NULL is a no-op. */
void kst_docs_close(kst_docs *r);

/* One query; lifetimes as kst_doc. */
typedef struct kst_query {
    const char *id;
    const char *text;
    size_t id_len, text_len;
    size_t line;
} kst_query;

typedef struct kst_queries kst_queries;

/* As the kst_docs functions, for queries (TSV or BEIR; KST_FORMAT_PYSERINI is KST_ERR_INVALID). */
int kst_queries_open(const char *path, kst_rec_format format, kst_queries **out, kst_error *err);
int kst_queries_next(kst_queries *r, kst_query *q, kst_error *err);
kst_rec_format kst_queries_format(const kst_queries *r);
kst_stream *kst_queries_stream(kst_queries *r);
void kst_queries_close(kst_queries *r);

#endif
