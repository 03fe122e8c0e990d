/* store.h - the SQLite side of an index directory: documents, their FTS5 index for BM25, manifest.
 *
 * An index directory holds `docs.sqlite`, in WAL mode, with schema version KST_STORE_SCHEMA_VERSION
 * in `PRAGMA user_version` and application id 'KSTR' in `PRAGMA application_id`:
 *
 *   documents(id INTEGER PRIMARY KEY AUTOINCREMENT, ext_id TEXT UNIQUE NOT NULL, title TEXT,
 *             text TEXT NOT NULL, meta TEXT CHECK (meta IS NULL OR json_valid(meta)))
 *   documents_fts   FTS5 over (title, text), external content = documents, kept in step by
 *                   triggers on documents (insert, delete, update), so no write path can forget it.
 *                   Tokenizer `porter unicode61 remove_diacritics 2` (see store.c for why).
 *   manifest(key TEXT PRIMARY KEY, value) WITHOUT ROWID: model_fingerprint (sha256 hex of the
 *                   model's weight files, "" for a BM25-only index), dims, faiss_factory,
 *                   doc_count (kept by the same triggers), generation (+1 per committed write),
 *                   tokenizer; other layers may add their own keys (kst_store_meta_set).
 *
 * Internal ids are never reused (AUTOINCREMENT): re-adding an external id deletes the old row and
 * inserts a new one with a NEW internal id, and reports the old one so that the vector layers drop
 * its vectors. A vector left behind by a crash between the two layers then points at no document
 * and can never be shown with another document's text.
 *
 * Concurrency: one writer at a time across processes (kst_store_begin takes SQLite's write lock
 * at once, waiting up to the busy timeout, then fails with a message saying the index is being
 * written); any number of readers keep reading the last committed state while a write is open.
 * A handle is not thread-safe: use one handle per thread (they are cheap).
 *
 * Crash safety: every write happens inside kst_store_begin/commit; `synchronous=FULL` makes a
 * returned commit durable even across power loss, and a kill at any moment leaves the database at
 * the previous or the new commit (tests/test_store.c kills a writer with SIGKILL to check). */
#ifndef KST_INDEX_STORE_H
#define KST_INDEX_STORE_H

#include <stddef.h>
#include <stdint.h>

#include "core/error.h"

#define KST_STORE_SCHEMA_VERSION 1
#define KST_STORE_FILE "docs.sqlite"
/* Busy timeout a new handle starts with (kst_store_set_busy_timeout changes it). */
#define KST_STORE_BUSY_MS_DEFAULT 5000

typedef struct kst_store kst_store;

enum {
    KST_STORE_CREATE = 1,   /* create the folder (one level) and the database when missing */
    KST_STORE_READONLY = 2, /* open for reading only; cannot be combined with CREATE */
};

/* Opens (or with KST_STORE_CREATE, creates) `dir`/docs.sqlite. Fails with KST_ERR_NOTFOUND when
 * the index does not exist (and CREATE is not set), KST_ERR_FORMAT when the file is not an SQLite
 * database or not a Kestrel index, KST_ERR_UNSUPPORTED for a schema version this build does not
 * know (naming both versions). On failure *out is NULL. Close with kst_store_close. */
int kst_store_open(const char *dir, int flags, kst_store **out, kst_error *err);
/* Closes; an open write transaction is rolled back. NULL is a no-op. */
void kst_store_close(kst_store *s);
/* Milliseconds to wait for another writer's lock before kst_store_begin fails. */
void kst_store_set_busy_timeout(kst_store *s, int ms);
/* Path of the database file (owned by the handle). */
const char *kst_store_path(const kst_store *s);

/* ---- writes: every add/delete/manifest change sits between begin and commit/rollback ---- */

/* Takes the write lock (BEGIN IMMEDIATE). Fails with KST_ERR_IO naming the file when another
 * writer holds the lock past the busy timeout, KST_ERR_MISUSE when a transaction is already open
 * on this handle or the handle is read-only. */
int kst_store_begin(kst_store *s, kst_error *err);
/* Increments the generation (when anything was written) and commits. On failure the transaction
 * is rolled back and nothing of it is kept. */
int kst_store_commit(kst_store *s, kst_error *err);
/* Drops the open transaction; a no-op without one. */
int kst_store_rollback(kst_store *s, kst_error *err);

/* Adds a document. ext_id: non-empty UTF-8; title, meta_json may be NULL; text NULL means "".
 * Every string must be valid UTF-8 (else KST_ERR_FORMAT naming the external id, the field and the
 * byte offset) and meta_json valid JSON. When ext_id exists, that document is replaced.
 * OUT *internal_id (may be NULL): the new internal id. OUT *replaced_id (may be NULL): the internal
 * id of the replaced document, or -1 when ext_id was new. On failure the transaction is left as
 * it was before the call. */
int kst_store_add(kst_store *s, const char *ext_id, const char *title, const char *text,
                  const char *meta_json, int64_t *internal_id, int64_t *replaced_id,
                  kst_error *err);
/* Deletes n documents by external id. OUT removed (n slots, may be NULL): the internal id each
 * one had, or -1 when it was not in the index (not an error). OUT *n_removed (may be NULL): how
 * many were deleted. All or nothing: on failure none of them is deleted. */
int kst_store_delete(kst_store *s, const char *const *ext_ids, size_t n, int64_t *removed,
                     size_t *n_removed, kst_error *err);

/* ---- reads ---- */

/* Starts a read snapshot: until kst_store_read_end, every read on this handle sees the same
 * committed state (e.g. BM25 hits and their texts). Optional; without it each call reads the
 * latest commit. */
int kst_store_read_begin(kst_store *s, kst_error *err);
void kst_store_read_end(kst_store *s);

/* A stored document; every field is owned by it (free with kst_store_doc_free). */
typedef struct kst_store_doc {
    int64_t id;
    char *ext_id;
    char *title; /* NULL when stored without one */
    char *text;
    char *meta;  /* NULL when stored without one */
} kst_store_doc;

/* Reads document `id`. KST_ERR_NOTFOUND when there is none (deleted or never added). */
int kst_store_get(kst_store *s, int64_t id, kst_store_doc *out, kst_error *err);
/* Reads the n documents ids[i] into out[i] from one read snapshot (the caller's, when one is open;
 * cheaper than n kst_store_get calls outside one). KST_ERR_NOTFOUND names the first id that has
 * no document; on any error every out[i] is left zeroed. */
int kst_store_get_many(kst_store *s, const int64_t *ids, size_t n, kst_store_doc *out,
                       kst_error *err);
/* Frees the fields and zeroes *doc; a zeroed doc is a no-op. */
void kst_store_doc_free(kst_store_doc *doc);
/* External id of document `id` into buf (cap bytes). KST_ERR_NOTFOUND when absent,
 * KST_ERR_INVALID when it does not fit. */
int kst_store_ext_id(kst_store *s, int64_t id, char *buf, size_t cap, kst_error *err);
/* As kst_store_ext_id, into a new string the caller frees with kst_free. */
int kst_store_ext_id_dup(kst_store *s, int64_t id, char **out, kst_error *err);
/* Calls fn for every document's (internal id, external id, its length), in id order, as this
 * connection sees the table; a non-zero return from fn stops the scan and is returned. */
typedef int (*kst_store_ext_id_fn)(void *ctx, int64_t id, const char *ext_id, size_t len);
int kst_store_scan_ext_ids(kst_store *s, kst_store_ext_id_fn fn, void *ctx, kst_error *err);
/* Internal id of `ext_id`, KST_ERR_NOTFOUND when absent. */
int kst_store_lookup(kst_store *s, const char *ext_id, int64_t *id, kst_error *err);
/* Number of documents (from the manifest, O(1)). */
int kst_store_count(kst_store *s, int64_t *count, kst_error *err);

/* ---- BM25 ---- */

typedef struct kst_store_hit {
    int64_t id;   /* internal id */
    double score; /* -bm25(): higher is better */
} kst_store_hit;

typedef struct kst_store_hits {
    size_t n;
    kst_store_hit hit[]; /* (n) best first; ties by ascending id */
} kst_store_hits;

/* Most words a BM25 query may have (as Lucene's maxClauseCount): FTS5 reads each word's doclist
 * once per occurrence, so a query repeating a common word 100,000 times would run for minutes. */
#define KST_STORE_MAX_QUERY_WORDS 1024

/* Top-k documents for arbitrary user text by FTS5's bm25() (k1 = 1.2, b = 0.75, title and text
 * counted as one field): the text is split into words and each becomes a quoted FTS5 string,
 * joined by OR, so no FTS5 query syntax in it has any effect. A word repeated in the query counts
 * once per occurrence. Text without words (empty, only punctuation) gives zero hits and no
 * error; more than KST_STORE_MAX_QUERY_WORDS words is KST_ERR_INVALID. *out is always set on
 * success; free with kst_store_hits_free. */
int kst_store_bm25(kst_store *s, const char *query, size_t k, kst_store_hits **out,
                   kst_error *err);
void kst_store_hits_free(kst_store_hits *hits);

/* The FTS5 MATCH expression kst_store_bm25 uses for `query` ("" when it has no words); free with
 * kst_free. Exposed for tests and for `kestrel search --explain`. */
int kst_store_fts_query(const char *query, char **out, kst_error *err);

/* ---- manifest ---- */

#define KST_STORE_FACTORY_MAX 256

typedef struct kst_store_manifest {
    int schema_version;
    char model_fingerprint[65];               /* sha256 hex, "" for a BM25-only index */
    long dims;                                /* 0 without a model */
    char faiss_factory[KST_STORE_FACTORY_MAX]; /* "" without a dense index */
    int64_t doc_count;
    int64_t generation;                       /* committed writes so far */
} kst_store_manifest;

int kst_store_manifest_read(kst_store *s, kst_store_manifest *out, kst_error *err);
/* Records the model the index is built with (inside a transaction). fingerprint: 64 lowercase
 * hex digits; factory may be NULL ("" kept). */
int kst_store_set_model(kst_store *s, const char *fingerprint, long dims, const char *factory,
                        kst_error *err);
/* Checks that `fingerprint` (of the model the caller is about to use) is the one the index was
 * built with. A different one is KST_ERR_INVALID naming the file, both fingerprints and the way
 * out (rebuild the index, or pass the model it was built with); an index built without a model
 * is KST_ERR_INVALID too. */
int kst_store_check_model(kst_store *s, const char *fingerprint, kst_error *err);

/* Other layers' manifest entries (e.g. the FAISS file's generation). get: *out is a kst_malloc'd
 * copy (free with kst_free), KST_ERR_NOTFOUND when the key is absent. set: inside a transaction. */
int kst_store_meta_get(kst_store *s, const char *key, char **out, kst_error *err);
int kst_store_meta_set(kst_store *s, const char *key, const char *value, kst_error *err);

/* ---- ColBERT token rows (index/tokens.h) ---- */

/* Records that document `id`'s token vectors are rows [first, first + count) of the token store
 * (inside a transaction; deleting the document drops the record). */
int kst_store_set_tokens(kst_store *s, int64_t id, uint64_t first, uint64_t count, kst_error *err);
/* KST_ERR_NOTFOUND when the document has none. */
int kst_store_get_tokens(kst_store *s, int64_t id, uint64_t *first, uint64_t *count, kst_error *err);

/* sha256 over the files' bytes, in order, streamed (never loaded whole), as 64 lowercase hex
 * digits + NUL into hex_out. For one file it equals `sha256sum FILE`. KST_ERR_IO names the file
 * that could not be read. */
int kst_store_fingerprint_files(const char *const *paths, size_t n, char hex_out[65],
                                kst_error *err);

#endif
