/* store.c - docs.sqlite: documents, the FTS5 index BM25 reads, the manifest; WAL, one writer.
 *
 * Choices, and why:
 * - WAL journal: readers keep their snapshot while a writer works, and a kill at any moment
 *   leaves the last commit (the WAL frames of an unfinished transaction are ignored on recovery).
 * - synchronous=FULL: in WAL mode NORMAL already survives a process crash, but a power loss may
 *   undo the last commits. The FAISS file is replaced atomically (fsync + rename) beside this
 *   database; if SQLite could forget a commit the vector file already reflects, the two layers
 *   would disagree after a power cut. FULL costs one fsync per commit, and the index commits
 *   per batch of documents, so the cost is noise.
 * - BEGIN IMMEDIATE: the write lock is taken at begin, so a second writer waits (busy timeout)
 *   at a point where it holds nothing, and never hits SQLITE_BUSY half-way through its batch.
 * - FTS5 with external content (content=documents): the text is stored once. External content
 *   needs the old values to delete an entry; triggers on documents pass them, so inserts,
 *   deletes and updates through any statement keep the full-text index exact. Checked in the
 *   tests by FTS5's own 'integrity-check' (with rank=1 it compares the index with the content).
 * - Tokenizer `porter unicode61 remove_diacritics 2`: unicode61 splits on Unicode letter/number
 *   classes and folds case; remove_diacritics 2 folds accents correctly for every code point
 *   (1 misses letters with several diacritics); porter stems English, as the BM25 baselines
 *   people compare with (Anserini/Lucene English analyzer) do. No stopword list: FTS5 has none,
 *   and bm25() floors the IDF of a term in over half the documents at 1e-6, which silences the
 *   commonest words.
 * - bm25() as FTS5 computes it (ext/fts5/fts5_aux.c): k1 = 1.2, b = 0.75, IDF = ln((N - n + 0.5)
 *   / (n + 0.5)) floored at 1e-6, document length = tokens in title + text, one field. */
#include "store.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include <sqlite3.h>
#include <utf8proc.h>

#include "core/check.h"
#include "core/file.h"
#include "core/json.h"
#include "core/mem.h"
#include "sha256.h"

/* ------------------------------------------------------------------------------------------ */
/* Schema                                                                                     */
/* ------------------------------------------------------------------------------------------ */

/* 'KSTR': tells a Kestrel index from any other SQLite file. */
#define KST_STORE_APP_ID 0x4B535452
#define KST_STORE_TOKENIZER "porter unicode61 remove_diacritics 2"

static const char SCHEMA_SQL[] =
    "CREATE TABLE documents("
    "  id INTEGER PRIMARY KEY AUTOINCREMENT,"
    "  ext_id TEXT NOT NULL UNIQUE,"
    "  title TEXT,"
    "  text TEXT NOT NULL DEFAULT '',"
    "  meta TEXT CHECK (meta IS NULL OR json_valid(meta)));"
    "CREATE TABLE manifest(key TEXT PRIMARY KEY, value) WITHOUT ROWID;"
    /* ColBERT token rows of each document in the token store (index/tokens.h). */
    "CREATE TABLE doc_tokens(id INTEGER PRIMARY KEY, first INTEGER NOT NULL, count INTEGER NOT NULL);"
    "CREATE VIRTUAL TABLE documents_fts USING fts5(title, text, content='documents',"
    "  content_rowid='id', tokenize='" KST_STORE_TOKENIZER "');"
    "CREATE TRIGGER documents_ai AFTER INSERT ON documents BEGIN"
    "  INSERT INTO documents_fts(rowid, title, text) VALUES (new.id, new.title, new.text);"
    "  UPDATE manifest SET value = value + 1 WHERE key = 'doc_count';"
    "END;"
    "CREATE TRIGGER documents_ad AFTER DELETE ON documents BEGIN"
    "  INSERT INTO documents_fts(documents_fts, rowid, title, text)"
    "    VALUES ('delete', old.id, old.title, old.text);"
    "  UPDATE manifest SET value = value - 1 WHERE key = 'doc_count';"
    "  DELETE FROM doc_tokens WHERE id = old.id;"
    "END;"
    "CREATE TRIGGER documents_au AFTER UPDATE OF id, title, text ON documents BEGIN"
    "  INSERT INTO documents_fts(documents_fts, rowid, title, text)"
    "    VALUES ('delete', old.id, old.title, old.text);"
    "  INSERT INTO documents_fts(rowid, title, text) VALUES (new.id, new.title, new.text);"
    "END;"
    "INSERT INTO manifest(key, value) VALUES"
    "  ('model_fingerprint', ''), ('dims', 0), ('faiss_factory', ''), ('doc_count', 0),"
    "  ('generation', 0), ('tokenizer', '" KST_STORE_TOKENIZER "');";

/* Prepared once per handle; ST_* index this table. */
enum {
    ST_BEGIN, ST_COMMIT, ST_ROLLBACK, ST_SAVEPOINT, ST_RELEASE, ST_ROLLBACK_TO, ST_BUMP_GEN,
    ST_DELETE_EXT, ST_INSERT, ST_GET, ST_EXT_ID, ST_LOOKUP, ST_META_GET, ST_META_SET, ST_META_ALL,
    ST_BM25, ST_READ_BEGIN, ST_TOK_SET, ST_TOK_GET, ST_SCAN_IDS, ST_COUNT_
};
static const char *const STMT_SQL[ST_COUNT_] = {
    [ST_BEGIN] = "BEGIN IMMEDIATE",
    [ST_COMMIT] = "COMMIT",
    [ST_ROLLBACK] = "ROLLBACK",
    [ST_SAVEPOINT] = "SAVEPOINT kst_op",
    [ST_RELEASE] = "RELEASE kst_op",
    [ST_ROLLBACK_TO] = "ROLLBACK TO kst_op",
    [ST_BUMP_GEN] = "UPDATE manifest SET value = value + 1 WHERE key = 'generation'",
    [ST_DELETE_EXT] = "DELETE FROM documents WHERE ext_id = ?1 RETURNING id",
    [ST_INSERT] = "INSERT INTO documents(ext_id, title, text, meta) VALUES (?1, ?2, ?3, ?4)",
    [ST_GET] = "SELECT ext_id, title, text, meta FROM documents WHERE id = ?1",
    [ST_EXT_ID] = "SELECT ext_id FROM documents WHERE id = ?1",
    [ST_LOOKUP] = "SELECT id FROM documents WHERE ext_id = ?1",
    [ST_META_GET] = "SELECT value FROM manifest WHERE key = ?1",
    [ST_META_SET] = "INSERT INTO manifest(key, value) VALUES (?1, ?2)"
                    " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
    [ST_META_ALL] = "SELECT key, value FROM manifest",
    /* Ties broken by id so runs are reproducible. */
    [ST_BM25] = "SELECT rowid, bm25(documents_fts) AS r FROM documents_fts"
                " WHERE documents_fts MATCH ?1 ORDER BY r, rowid LIMIT ?2",
    [ST_READ_BEGIN] = "BEGIN DEFERRED",
    [ST_TOK_SET] = "INSERT OR REPLACE INTO doc_tokens(id, first, count) VALUES (?1, ?2, ?3)",
    [ST_TOK_GET] = "SELECT first, count FROM doc_tokens WHERE id = ?1",
    [ST_SCAN_IDS] = "SELECT id, ext_id FROM documents ORDER BY id",
};

struct kst_store {
    sqlite3 *db;
    char *path;     /* dir/docs.sqlite */
    int readonly;
    int in_write;   /* BEGIN IMMEDIATE open on this handle */
    int dirty;      /* something was written in it (the commit bumps the generation) */
    int in_read;    /* kst_store_read_begin open */
    int busy_ms;
    sqlite3_stmt *st[ST_COUNT_];
};

/* ------------------------------------------------------------------------------------------ */
/* Helpers                                                                                    */
/* ------------------------------------------------------------------------------------------ */

/* Maps an SQLite result code onto a Kestrel status. */
static int status_of(int sqlite_rc) {
    switch (sqlite_rc & 0xff) {
    case SQLITE_NOMEM: return KST_ERR_NOMEM;
    case SQLITE_TOOBIG: return KST_ERR_INVALID;
    case SQLITE_CONSTRAINT: return KST_ERR_FORMAT;
    case SQLITE_CORRUPT:
    case SQLITE_NOTADB: return KST_ERR_FORMAT;
    case SQLITE_READONLY:
    case SQLITE_MISUSE: return KST_ERR_MISUSE;
    case SQLITE_BUSY:
    case SQLITE_LOCKED:
    case SQLITE_IOERR:
    case SQLITE_FULL:
    case SQLITE_CANTOPEN:
    case SQLITE_PERM: return KST_ERR_IO;
    default: return KST_ERR_INTERNAL;
    }
}

/* Fills err from the connection's last error: "<path>: <what>: <sqlite message>". */
static int sql_fail(kst_store *s, kst_error *err, int sqlite_rc, const char *what) {
    return kst_fail(err, status_of(sqlite_rc), "%s: %s: %s", s->path, what,
                    s->db ? sqlite3_errmsg(s->db) : sqlite3_errstr(sqlite_rc));
}

/* Steps a statement that returns no rows, then resets it. */
static int exec_stmt(kst_store *s, int which, kst_error *err, const char *what) {
    sqlite3_stmt *st = s->st[which];
    int rc = sqlite3_step(st);
    sqlite3_reset(st);
    if (rc != SQLITE_DONE && rc != SQLITE_ROW) return sql_fail(s, err, rc, what);
    return KST_OK;
}

static void reset_stmt(sqlite3_stmt *st) {
    sqlite3_reset(st);
    sqlite3_clear_bindings(st);
}

/* Runs SQL text with no results (schema, pragmas). */
static int exec_sql(kst_store *s, const char *sql, kst_error *err, const char *what) {
    int rc = sqlite3_exec(s->db, sql, NULL, NULL, NULL);
    return rc == SQLITE_OK ? KST_OK : sql_fail(s, err, rc, what);
}

/* Reads a one-integer pragma. */
static int pragma_int(kst_store *s, const char *sql, long long *out, kst_error *err) {
    sqlite3_stmt *st = NULL;
    int rc = sqlite3_prepare_v2(s->db, sql, -1, &st, NULL);
    if (rc == SQLITE_OK) {
        rc = sqlite3_step(st);
        if (rc == SQLITE_ROW) {
            *out = sqlite3_column_int64(st, 0);
            rc = SQLITE_OK;
        }
    }
    sqlite3_finalize(st);
    if (rc == SQLITE_NOTADB)
        return kst_fail(err, KST_ERR_FORMAT, "%s: not an SQLite database (expected a Kestrel "
                        "index's docs.sqlite)", s->path);
    return rc == SQLITE_OK ? KST_OK : sql_fail(s, err, rc, sql);
}

/* Strict UTF-8 check (no overlongs, surrogates or code points past U+10FFFF). Returns the byte
 * offset of the first bad sequence, or (size_t)-1 when all of s[0..n) is valid. */
static size_t utf8_bad_offset(const unsigned char *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        unsigned c = s[i];
        size_t len;
        unsigned cp;
        if (c < 0x80) {
            i++;
            continue;
        } else if (c >= 0xC2 && c <= 0xDF) {
            len = 2;
            cp = c & 0x1F;
        } else if (c >= 0xE0 && c <= 0xEF) {
            len = 3;
            cp = c & 0x0F;
        } else if (c >= 0xF0 && c <= 0xF4) {
            len = 4;
            cp = c & 0x07;
        } else {
            return i;
        }
        if (n - i < len) return i;
        for (size_t j = 1; j < len; j++) {
            if ((s[i + j] & 0xC0) != 0x80) return i;
            cp = (cp << 6) | (s[i + j] & 0x3F);
        }
        if ((len == 3 && cp < 0x800) || (len == 4 && (cp < 0x10000 || cp > 0x10FFFF)) ||
            (cp >= 0xD800 && cp <= 0xDFFF))
            return i;
        i += len;
    }
    return (size_t)-1;
}

static int check_utf8(const char *field, const char *ext_id, const char *v, size_t n,
                      kst_error *err) {
    size_t at = utf8_bad_offset((const unsigned char *)v, n);
    if (at == (size_t)-1) return KST_OK;
    return kst_fail(err, KST_ERR_FORMAT,
                    "document \"%.100s\": %s is not valid UTF-8 (bad byte 0x%02x at byte offset "
                    "%zu of %zu); convert the collection to UTF-8",
                    ext_id ? ext_id : "(id not shown: invalid)", field,
                    (unsigned char)v[at], at, n);
}

static int need_write(kst_store *s, const char *what, kst_error *err) {
    if (!s) return kst_fail(err, KST_ERR_MISUSE, "%s: NULL store", what);
    if (s->readonly)
        return kst_fail(err, KST_ERR_MISUSE, "%s: %s was opened read-only", s->path, what);
    if (!s->in_write)
        return kst_fail(err, KST_ERR_MISUSE, "%s: %s outside a transaction (call kst_store_begin "
                        "first)", s->path, what);
    return KST_OK;
}

/* Undoes a failed add/delete back to its savepoint. When SQLite already rolled back the whole
 * transaction (disk full, I/O error), says so in err. */
static void op_abort(kst_store *s, kst_error *err) {
    if (sqlite3_get_autocommit(s->db)) {
        s->in_write = 0;
        s->dirty = 0;
        kst_error_prefix(err, "the whole transaction was rolled back");
        return;
    }
    sqlite3_step(s->st[ST_ROLLBACK_TO]);
    sqlite3_reset(s->st[ST_ROLLBACK_TO]);
    sqlite3_step(s->st[ST_RELEASE]);
    sqlite3_reset(s->st[ST_RELEASE]);
}

/* ------------------------------------------------------------------------------------------ */
/* Open / close                                                                               */
/* ------------------------------------------------------------------------------------------ */

/* Creates the schema when the database is new (user_version 0 and no tables), inside one write
 * transaction so two creators racing cannot both do it. */
static int create_schema(kst_store *s, kst_error *err) {
    int rc = exec_sql(s, "BEGIN IMMEDIATE", err, "creating the schema");
    if (rc != KST_OK) return rc;
    long long version = 0, tables = 0;
    KST_TRY(pragma_int(s, "PRAGMA user_version", &version, err));
    KST_TRY(pragma_int(s, "SELECT count(*) FROM sqlite_master", &tables, err));
    if (version == 0 && tables == 0) {
        char pragmas[128];
        snprintf(pragmas, sizeof pragmas, "PRAGMA user_version = %d; PRAGMA application_id = %d;",
                 KST_STORE_SCHEMA_VERSION, KST_STORE_APP_ID);
        KST_TRY(exec_sql(s, SCHEMA_SQL, err, "creating the schema"));
        KST_TRY(exec_sql(s, pragmas, err, "setting the schema version"));
    }
    return exec_sql(s, "COMMIT", err, "creating the schema");
done:
    sqlite3_exec(s->db, "ROLLBACK", NULL, NULL, NULL);
    return rc;
}

/* Checks the application id and schema version of an existing file. */
static int check_schema(kst_store *s, kst_error *err) {
    long long version = 0, app = 0, tables = 0;
    int rc = pragma_int(s, "PRAGMA user_version", &version, err);
    if (rc == KST_OK) rc = pragma_int(s, "PRAGMA application_id", &app, err);
    if (rc == KST_OK) rc = pragma_int(s, "SELECT count(*) FROM sqlite_master", &tables, err);
    if (rc != KST_OK) return rc;
    if (version == 0 && tables == 0)
        return kst_fail(err, KST_ERR_FORMAT, "%s: empty database, not a Kestrel index (an "
                        "interrupted build?); rebuild the index", s->path);
    if (app != KST_STORE_APP_ID)
        return kst_fail(err, KST_ERR_FORMAT, "%s: not a Kestrel index (application_id %lld, "
                        "expected %d)", s->path, app, KST_STORE_APP_ID);
    if (version != KST_STORE_SCHEMA_VERSION)
        return kst_fail(err, KST_ERR_UNSUPPORTED, "%s: index schema version %lld, but this "
                        "Kestrel reads version %d; %s", s->path, version, KST_STORE_SCHEMA_VERSION,
                        version > KST_STORE_SCHEMA_VERSION ? "upgrade Kestrel"
                                                           : "rebuild the index");
    return KST_OK;
}

/* Puts the file in WAL mode (persistent: a property of the file). */
static int set_wal(kst_store *s, kst_error *err) {
    sqlite3_stmt *st = NULL;
    int src = sqlite3_prepare_v2(s->db, "PRAGMA journal_mode = WAL", -1, &st, NULL);
    if (src == SQLITE_OK) src = sqlite3_step(st);
    int wal = src == SQLITE_ROW &&
              sqlite3_stricmp((const char *)sqlite3_column_text(st, 0), "wal") == 0;
    sqlite3_finalize(st);
    if (src != SQLITE_ROW) return sql_fail(s, err, src, "setting WAL mode");
    if (!wal)
        return kst_fail(err, KST_ERR_IO, "%s: SQLite refused WAL mode (is the folder on a "
                        "network file system?)", s->path);
    return KST_OK;
}

int kst_store_open(const char *dir, int flags, kst_store **out, kst_error *err) {
    if (out) *out = NULL;
    if (!dir || !out) return kst_fail(err, KST_ERR_INVALID, "kst_store_open: NULL argument");
    int create = flags & KST_STORE_CREATE, readonly = flags & KST_STORE_READONLY;
    if (create && readonly)
        return kst_fail(err, KST_ERR_MISUSE, "%s: cannot open an index both to create and "
                        "read-only", dir);
    char path[4096];
    int rc = kst_path_join(path, sizeof path, dir, KST_STORE_FILE, err);
    if (rc != KST_OK) return rc;

    if (create) {
        if (mkdir(dir, 0777) != 0 && errno != EEXIST)
            return kst_fail(err, KST_ERR_IO, "%s: cannot create the index folder: %s", dir,
                            strerror(errno));
    } else if (!kst_path_exists(path)) {
        return kst_fail(err, KST_ERR_NOTFOUND, "%s: no index here (%s is missing); build one "
                        "with `kestrel index build`", dir, path);
    }

    kst_store *s = kst_calloc(1, sizeof *s, "index store handle", err);
    if (!s) return KST_ERR_NOMEM;
    s->readonly = readonly ? 1 : 0;
    s->busy_ms = KST_STORE_BUSY_MS_DEFAULT;
    s->path = kst_strndup(path, (size_t)-1, err);
    if (!s->path) {
        rc = KST_ERR_NOMEM;
        goto done;
    }
    int oflags = readonly ? SQLITE_OPEN_READONLY
                          : SQLITE_OPEN_READWRITE | (create ? SQLITE_OPEN_CREATE : 0);
    int src = sqlite3_open_v2(path, &s->db, oflags, NULL);
    if (src != SQLITE_OK) {
        rc = s->db ? sql_fail(s, err, src, "cannot open")
                   : kst_fail(err, KST_ERR_NOMEM, "%s: out of memory opening SQLite", path);
        goto done;
    }
    sqlite3_extended_result_codes(s->db, 1);
    sqlite3_busy_timeout(s->db, s->busy_ms);

    /* Look before changing anything: another program's database is refused untouched. */
    long long version = 0, tables = 0;
    KST_TRY(pragma_int(s, "PRAGMA user_version", &version, err));
    KST_TRY(pragma_int(s, "SELECT count(*) FROM sqlite_master", &tables, err));
    if (create && version == 0 && tables == 0) {
        KST_TRY(set_wal(s, err));
        KST_TRY(create_schema(s, err));
    }
    KST_TRY(check_schema(s, err));
    if (!readonly) {
        KST_TRY(set_wal(s, err)); /* a no-op on an index, which is WAL from its creation */
        KST_TRY(exec_sql(s, "PRAGMA synchronous = FULL", err, "setting synchronous"));
    }
    /* Reads through a memory map (up to 1 GiB of the file) instead of SQLite's page cache: a
     * search fetches its k hits' rows, and with the default cache each row of a large index
     * cost a read() call (4.9 us at 1M documents, measured by tests/bench/search.sh). */
    KST_TRY(exec_sql(s, "PRAGMA mmap_size = 1073741824", err, "setting mmap_size"));

    for (int i = 0; i < ST_COUNT_; i++) {
        src = sqlite3_prepare_v3(s->db, STMT_SQL[i], -1, SQLITE_PREPARE_PERSISTENT, &s->st[i],
                                 NULL);
        if (src != SQLITE_OK) {
            rc = sql_fail(s, err, src, STMT_SQL[i]);
            goto done;
        }
    }
    *out = s;
    return KST_OK;
done:
    kst_store_close(s);
    return rc;
}

void kst_store_close(kst_store *s) {
    if (!s) return;
    if (s->db && !sqlite3_get_autocommit(s->db)) sqlite3_exec(s->db, "ROLLBACK", NULL, NULL, NULL);
    for (int i = 0; i < ST_COUNT_; i++) sqlite3_finalize(s->st[i]);
    sqlite3_close_v2(s->db);
    kst_free(s->path);
    kst_free(s);
}

void kst_store_set_busy_timeout(kst_store *s, int ms) {
    if (!s) return;
    s->busy_ms = ms < 0 ? 0 : ms;
    sqlite3_busy_timeout(s->db, s->busy_ms);
}

const char *kst_store_path(const kst_store *s) { return s ? s->path : NULL; }

/* ------------------------------------------------------------------------------------------ */
/* Transactions                                                                               */
/* ------------------------------------------------------------------------------------------ */

int kst_store_begin(kst_store *s, kst_error *err) {
    if (!s) return kst_fail(err, KST_ERR_MISUSE, "kst_store_begin: NULL store");
    if (s->readonly)
        return kst_fail(err, KST_ERR_MISUSE, "%s: cannot write, opened read-only", s->path);
    if (s->in_write || s->in_read)
        return kst_fail(err, KST_ERR_MISUSE, "%s: a %s transaction is already open on this "
                        "handle", s->path, s->in_write ? "write" : "read");
    int rc = sqlite3_step(s->st[ST_BEGIN]);
    sqlite3_reset(s->st[ST_BEGIN]);
    if ((rc & 0xff) == SQLITE_BUSY)
        return kst_fail(err, KST_ERR_IO, "%s: the index is being written by another writer; "
                        "waited %d ms for its lock (only one writer at a time)", s->path,
                        s->busy_ms);
    if (rc != SQLITE_DONE) return sql_fail(s, err, rc, "starting a write transaction");
    s->in_write = 1;
    s->dirty = 0;
    return KST_OK;
}

int kst_store_commit(kst_store *s, kst_error *err) {
    if (!s || !s->in_write)
        return kst_fail(err, KST_ERR_MISUSE, "%s: commit without kst_store_begin",
                        s ? s->path : "store");
    int rc = KST_OK;
    if (s->dirty) rc = exec_stmt(s, ST_BUMP_GEN, err, "incrementing the generation");
    if (rc == KST_OK) rc = exec_stmt(s, ST_COMMIT, err, "committing");
    if (rc != KST_OK && !sqlite3_get_autocommit(s->db)) {
        sqlite3_step(s->st[ST_ROLLBACK]);
        sqlite3_reset(s->st[ST_ROLLBACK]);
        kst_error_prefix(err, "commit failed, transaction rolled back");
    }
    s->in_write = 0;
    s->dirty = 0;
    return rc;
}

int kst_store_rollback(kst_store *s, kst_error *err) {
    if (!s || !s->in_write) return KST_OK;
    s->in_write = 0;
    s->dirty = 0;
    if (sqlite3_get_autocommit(s->db)) return KST_OK; /* SQLite already rolled it back */
    return exec_stmt(s, ST_ROLLBACK, err, "rolling back");
}

int kst_store_read_begin(kst_store *s, kst_error *err) {
    if (!s) return kst_fail(err, KST_ERR_MISUSE, "kst_store_read_begin: NULL store");
    if (s->in_write || s->in_read)
        return kst_fail(err, KST_ERR_MISUSE, "%s: a transaction is already open on this handle",
                        s->path);
    int rc = exec_stmt(s, ST_READ_BEGIN, err, "starting a read snapshot");
    if (rc != KST_OK) return rc;
    /* A deferred transaction takes its snapshot at the first read: read now. */
    int64_t n;
    rc = kst_store_count(s, &n, err);
    if (rc != KST_OK) {
        sqlite3_exec(s->db, "ROLLBACK", NULL, NULL, NULL);
        return rc;
    }
    s->in_read = 1;
    return KST_OK;
}

void kst_store_read_end(kst_store *s) {
    if (!s || !s->in_read) return;
    s->in_read = 0;
    if (!sqlite3_get_autocommit(s->db)) exec_stmt(s, ST_ROLLBACK, NULL, "ending a read snapshot");
}

/* ------------------------------------------------------------------------------------------ */
/* Add / delete                                                                               */
/* ------------------------------------------------------------------------------------------ */

static int bind_text(kst_store *s, sqlite3_stmt *st, int i, const char *v, size_t n,
                     const char *ext_id, const char *field, kst_error *err) {
    int rc = v ? sqlite3_bind_text64(st, i, v, n, SQLITE_STATIC, SQLITE_UTF8)
               : sqlite3_bind_null(st, i);
    if (rc == SQLITE_OK) return KST_OK;
    if (rc == SQLITE_TOOBIG)
        return kst_fail(err, KST_ERR_INVALID, "%s: document \"%.100s\": %s of %zu bytes is over "
                        "SQLite's limit of %d bytes", s->path, ext_id, field, n,
                        sqlite3_limit(s->db, SQLITE_LIMIT_LENGTH, -1));
    return sql_fail(s, err, rc, field);
}

int kst_store_add(kst_store *s, const char *ext_id, const char *title, const char *text,
                  const char *meta_json, int64_t *internal_id, int64_t *replaced_id,
                  kst_error *err) {
    int rc = need_write(s, "kst_store_add", err);
    if (rc != KST_OK) return rc;
    if (!ext_id || !*ext_id)
        return kst_fail(err, KST_ERR_INVALID, "%s: document with an empty external id", s->path);
    if (!text) text = "";
    size_t n_id = strlen(ext_id), n_title = title ? strlen(title) : 0, n_text = strlen(text);
    size_t n_meta = meta_json ? strlen(meta_json) : 0;
    KST_TRY(check_utf8("ext_id", NULL, ext_id, n_id, err));
    if (title) KST_TRY(check_utf8("title", ext_id, title, n_title, err));
    KST_TRY(check_utf8("text", ext_id, text, n_text, err));
    if (meta_json) {
        KST_TRY(check_utf8("meta", ext_id, meta_json, n_meta, err));
        char where[160];
        snprintf(where, sizeof where, "document \"%.100s\": meta", ext_id);
        cJSON *obj = NULL;
        KST_TRY(kst_json_parse(meta_json, n_meta, where, &obj, err));
        cJSON_Delete(obj);
    }

    int src = sqlite3_step(s->st[ST_SAVEPOINT]);
    sqlite3_reset(s->st[ST_SAVEPOINT]);
    if (src != SQLITE_DONE) return sql_fail(s, err, src, "add: savepoint");

    int64_t old = -1;
    sqlite3_stmt *del = s->st[ST_DELETE_EXT], *ins = s->st[ST_INSERT];
    rc = bind_text(s, del, 1, ext_id, n_id, ext_id, "ext_id", err);
    while (rc == KST_OK && (src = sqlite3_step(del)) == SQLITE_ROW) old = sqlite3_column_int64(del, 0);
    if (rc == KST_OK && src != SQLITE_DONE) rc = sql_fail(s, err, src, "add: replacing the old document");
    reset_stmt(del);
    if (rc == KST_OK) rc = bind_text(s, ins, 1, ext_id, n_id, ext_id, "ext_id", err);
    if (rc == KST_OK) rc = bind_text(s, ins, 2, title, n_title, ext_id, "title", err);
    if (rc == KST_OK) rc = bind_text(s, ins, 3, text, n_text, ext_id, "text", err);
    if (rc == KST_OK) rc = bind_text(s, ins, 4, meta_json, n_meta, ext_id, "meta", err);
    if (rc == KST_OK) {
        src = sqlite3_step(ins);
        if (src != SQLITE_DONE) {
            char what[160];
            snprintf(what, sizeof what, "adding document \"%.100s\"", ext_id);
            rc = sql_fail(s, err, src, what);
        }
    }
    reset_stmt(ins);
    if (rc == KST_OK) {
        int64_t id = sqlite3_last_insert_rowid(s->db);
        rc = exec_stmt(s, ST_RELEASE, err, "add: release");
        if (rc == KST_OK) {
            s->dirty = 1;
            if (internal_id) *internal_id = id;
            if (replaced_id) *replaced_id = old;
            return KST_OK;
        }
    }
    op_abort(s, err);
done:
    return rc;
}

int kst_store_delete(kst_store *s, const char *const *ext_ids, size_t n, int64_t *removed,
                     size_t *n_removed, kst_error *err) {
    int rc = need_write(s, "kst_store_delete", err);
    if (rc != KST_OK) return rc;
    if (n && !ext_ids) return kst_fail(err, KST_ERR_INVALID, "%s: delete: NULL id list", s->path);
    for (size_t i = 0; i < n; i++)
        if (!ext_ids[i])
            return kst_fail(err, KST_ERR_INVALID, "%s: delete: id %zu of %zu is NULL", s->path,
                            i + 1, n);
    int src = sqlite3_step(s->st[ST_SAVEPOINT]);
    sqlite3_reset(s->st[ST_SAVEPOINT]);
    if (src != SQLITE_DONE) return sql_fail(s, err, src, "delete: savepoint");
    size_t count = 0;
    sqlite3_stmt *del = s->st[ST_DELETE_EXT];
    for (size_t i = 0; i < n && rc == KST_OK; i++) {
        int64_t id = -1;
        rc = bind_text(s, del, 1, ext_ids[i], strlen(ext_ids[i]), ext_ids[i], "ext_id", err);
        while (rc == KST_OK && (src = sqlite3_step(del)) == SQLITE_ROW) id = sqlite3_column_int64(del, 0);
        if (rc == KST_OK && src != SQLITE_DONE) rc = sql_fail(s, err, src, "deleting a document");
        reset_stmt(del);
        if (removed) removed[i] = id;
        if (id >= 0) count++;
    }
    if (rc == KST_OK) rc = exec_stmt(s, ST_RELEASE, err, "delete: release");
    if (rc != KST_OK) {
        op_abort(s, err);
        if (removed)
            for (size_t i = 0; i < n; i++) removed[i] = -1;
        return rc;
    }
    if (count) s->dirty = 1;
    if (n_removed) *n_removed = count;
    return KST_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* Lookups                                                                                    */
/* ------------------------------------------------------------------------------------------ */

/* Copies column i (SQL NULL stays NULL). */
static int column_dup(sqlite3_stmt *st, int i, char **out, kst_error *err) {
    *out = NULL;
    if (sqlite3_column_type(st, i) == SQLITE_NULL) return KST_OK;
    const unsigned char *v = sqlite3_column_text(st, i);
    if (!v) return kst_fail(err, KST_ERR_NOMEM, "out of memory reading a document");
    *out = kst_strndup((const char *)v, (size_t)sqlite3_column_bytes(st, i), err);
    return *out ? KST_OK : KST_ERR_NOMEM;
}

int kst_store_get(kst_store *s, int64_t id, kst_store_doc *out, kst_error *err) {
    if (!s || !out) return kst_fail(err, KST_ERR_INVALID, "kst_store_get: NULL argument");
    memset(out, 0, sizeof *out);
    sqlite3_stmt *st = s->st[ST_GET];
    sqlite3_bind_int64(st, 1, id);
    int src = sqlite3_step(st), rc = KST_OK;
    if (src == SQLITE_DONE) {
        rc = kst_fail(err, KST_ERR_NOTFOUND, "%s: no document with internal id %lld", s->path,
                      (long long)id);
    } else if (src != SQLITE_ROW) {
        rc = sql_fail(s, err, src, "reading a document");
    } else {
        out->id = id;
        rc = column_dup(st, 0, &out->ext_id, err);
        if (rc == KST_OK) rc = column_dup(st, 1, &out->title, err);
        if (rc == KST_OK) rc = column_dup(st, 2, &out->text, err);
        if (rc == KST_OK) rc = column_dup(st, 3, &out->meta, err);
    }
    reset_stmt(st);
    if (rc != KST_OK) kst_store_doc_free(out);
    return rc;
}

/* Fills out[i] for ids[i] inside one read transaction: the caller's snapshot, or one taken here
 * (n autocommit statements would take n). One cached single-row statement per id measured faster
 * than an `id IN (...)` statement, whose list SQLite sorts into a temporary index first. */
int kst_store_get_many(kst_store *s, const int64_t *ids, size_t n, kst_store_doc *out,
                       kst_error *err) {
    if (!s || (n && (!ids || !out))) return kst_fail(err, KST_ERR_INVALID, "kst_store_get_many: NULL argument");
    memset(out, 0, n * sizeof *out);
    int own = n > 1 && sqlite3_get_autocommit(s->db);
    int rc = own ? exec_stmt(s, ST_READ_BEGIN, err, "starting a read snapshot") : KST_OK;
    for (size_t i = 0; i < n && rc == KST_OK; i++) rc = kst_store_get(s, ids[i], &out[i], err);
    if (own && !sqlite3_get_autocommit(s->db)) exec_stmt(s, ST_ROLLBACK, NULL, "ending a read snapshot");
    if (rc != KST_OK)
        for (size_t i = 0; i < n; i++) kst_store_doc_free(&out[i]);
    return rc;
}

void kst_store_doc_free(kst_store_doc *doc) {
    if (!doc) return;
    kst_free(doc->ext_id);
    kst_free(doc->title);
    kst_free(doc->text);
    kst_free(doc->meta);
    memset(doc, 0, sizeof *doc);
}

int kst_store_ext_id(kst_store *s, int64_t id, char *buf, size_t cap, kst_error *err) {
    if (!s || !buf || !cap) return kst_fail(err, KST_ERR_INVALID, "kst_store_ext_id: bad argument");
    char *v = NULL;
    int rc = kst_store_ext_id_dup(s, id, &v, err);
    if (rc != KST_OK) return rc;
    size_t n = strlen(v);
    if (n >= cap)
        rc = kst_fail(err, KST_ERR_INVALID, "%s: external id of document %lld is %zu bytes, "
                      "buffer holds %zu", s->path, (long long)id, n, cap - 1);
    else
        memcpy(buf, v, n + 1);
    kst_free(v);
    return rc;
}

int kst_store_ext_id_dup(kst_store *s, int64_t id, char **out, kst_error *err) {
    if (!s || !out) return kst_fail(err, KST_ERR_INVALID, "kst_store_ext_id_dup: NULL argument");
    *out = NULL;
    sqlite3_stmt *st = s->st[ST_EXT_ID];
    sqlite3_bind_int64(st, 1, id);
    int src = sqlite3_step(st), rc = KST_OK;
    if (src == SQLITE_ROW) {
        const unsigned char *v = sqlite3_column_text(st, 0);
        *out = v ? kst_strndup((const char *)v, (size_t)sqlite3_column_bytes(st, 0), err) : NULL;
        if (!*out) rc = v ? KST_ERR_NOMEM : kst_fail(err, KST_ERR_NOMEM, "%s: out of memory reading an external id", s->path);
    } else if (src == SQLITE_DONE) {
        rc = kst_fail(err, KST_ERR_NOTFOUND, "%s: no document with internal id %lld", s->path,
                      (long long)id);
    } else {
        rc = sql_fail(s, err, src, "reading an external id");
    }
    reset_stmt(st);
    return rc;
}

int kst_store_scan_ext_ids(kst_store *s, kst_store_ext_id_fn fn, void *ctx, kst_error *err) {
    if (!s || !fn) return kst_fail(err, KST_ERR_INVALID, "kst_store_scan_ext_ids: NULL argument");
    sqlite3_stmt *st = s->st[ST_SCAN_IDS];
    int src, rc = KST_OK;
    while (rc == KST_OK && (src = sqlite3_step(st)) == SQLITE_ROW) {
        const unsigned char *v = sqlite3_column_text(st, 1);
        if (!v) {
            rc = kst_fail(err, KST_ERR_NOMEM, "%s: out of memory reading external ids", s->path);
            break;
        }
        rc = fn(ctx, sqlite3_column_int64(st, 0), (const char *)v, (size_t)sqlite3_column_bytes(st, 1));
    }
    if (rc == KST_OK && src != SQLITE_DONE) rc = sql_fail(s, err, src, "reading the external ids");
    reset_stmt(st);
    return rc;
}

int kst_store_lookup(kst_store *s, const char *ext_id, int64_t *id, kst_error *err) {
    if (!s || !ext_id || !id) return kst_fail(err, KST_ERR_INVALID, "kst_store_lookup: NULL argument");
    sqlite3_stmt *st = s->st[ST_LOOKUP];
    int rc = bind_text(s, st, 1, ext_id, strlen(ext_id), ext_id, "ext_id", err);
    if (rc == KST_OK) {
        int src = sqlite3_step(st);
        if (src == SQLITE_ROW)
            *id = sqlite3_column_int64(st, 0);
        else if (src == SQLITE_DONE)
            rc = kst_fail(err, KST_ERR_NOTFOUND, "%s: no document with external id \"%.100s\"",
                          s->path, ext_id);
        else
            rc = sql_fail(s, err, src, "looking up an external id");
    }
    reset_stmt(st);
    return rc;
}

/* Reads manifest `key` as an integer. */
static int meta_int(kst_store *s, const char *key, int64_t *out, kst_error *err) {
    sqlite3_stmt *st = s->st[ST_META_GET];
    sqlite3_bind_text(st, 1, key, -1, SQLITE_STATIC);
    int src = sqlite3_step(st), rc = KST_OK;
    if (src == SQLITE_ROW)
        *out = sqlite3_column_int64(st, 0);
    else if (src == SQLITE_DONE)
        rc = kst_fail(err, KST_ERR_FORMAT, "%s: manifest lacks \"%s\"", s->path, key);
    else
        rc = sql_fail(s, err, src, "reading the manifest");
    reset_stmt(st);
    return rc;
}

int kst_store_count(kst_store *s, int64_t *count, kst_error *err) {
    if (!s || !count) return kst_fail(err, KST_ERR_INVALID, "kst_store_count: NULL argument");
    return meta_int(s, "doc_count", count, err);
}

/* ------------------------------------------------------------------------------------------ */
/* BM25                                                                                       */
/* ------------------------------------------------------------------------------------------ */

/* What unicode61 keeps inside a token: its default categories "L* N* Co", plus combining marks
 * (remove_diacritics folds them into the letter before). Everything else separates tokens, so a
 * word we quote is one token to FTS5 too. */
static int is_token_char(utf8proc_int32_t cp, int *is_mark) {
    utf8proc_category_t c = utf8proc_category(cp);
    *is_mark = c == UTF8PROC_CATEGORY_MN || c == UTF8PROC_CATEGORY_MC ||
               c == UTF8PROC_CATEGORY_ME;
    switch (c) {
    case UTF8PROC_CATEGORY_LU: case UTF8PROC_CATEGORY_LL: case UTF8PROC_CATEGORY_LT:
    case UTF8PROC_CATEGORY_LM: case UTF8PROC_CATEGORY_LO: case UTF8PROC_CATEGORY_ND:
    case UTF8PROC_CATEGORY_NL: case UTF8PROC_CATEGORY_NO: case UTF8PROC_CATEGORY_CO:
        return 1;
    default:
        return *is_mark;
    }
}

int kst_store_fts_query(const char *query, char **out, kst_error *err) {
    if (!out) return kst_fail(err, KST_ERR_INVALID, "kst_store_fts_query: NULL out");
    *out = NULL;
    if (!query) query = "";
    size_t len = strlen(query);
    /* Worst case one-byte words split by one-byte separators: each word costs 1 + 2 quotes +
     * " OR " = 7 bytes per 2 input bytes, so 4 * len + 8 always fits. The product is checked by
     * kst_malloc. */
    if (len > ((size_t)-1 - 8) / 4)
        return kst_fail(err, KST_ERR_NOMEM, "query of %zu bytes is too long", len);
    char *q = kst_malloc(4 * len + 8, 1, "FTS5 query", err);
    if (!q) return KST_ERR_NOMEM;
    const unsigned char *p = (const unsigned char *)query;
    size_t at = 0, i = 0, words = 0;
    while (i < len) {
        /* Find the next word: a run of token characters with at least one non-mark. */
        size_t start = i, end = i;
        int has_base = 0;
        while (i < len) {
            utf8proc_int32_t cp;
            utf8proc_ssize_t n = utf8proc_iterate(p + i, (utf8proc_ssize_t)(len - i), &cp);
            int mark = 0;
            if (n <= 0) { /* invalid UTF-8: a separator, one byte at a time */
                i++;
                break;
            }
            if (!is_token_char(cp, &mark)) {
                i += (size_t)n;
                break;
            }
            has_base |= !mark;
            i += (size_t)n;
            end = i;
        }
        if (end == start || !has_base) continue;
        if (++words > KST_STORE_MAX_QUERY_WORDS) {
            kst_free(q);
            return kst_fail(err, KST_ERR_INVALID, "query has more than %d words (the limit); "
                            "shorten it", KST_STORE_MAX_QUERY_WORDS);
        }
        if (at) {
            memcpy(q + at, " OR ", 4);
            at += 4;
        }
        q[at++] = '"';
        /* A word holds no '"' (punctuation separates), so no escaping is needed. */
        memcpy(q + at, p + start, end - start);
        at += end - start;
        q[at++] = '"';
    }
    q[at] = '\0';
    *out = q;
    return KST_OK;
}

void kst_store_hits_free(kst_store_hits *hits) { kst_free(hits); }

int kst_store_bm25(kst_store *s, const char *query, size_t k, kst_store_hits **out,
                   kst_error *err) {
    if (!s || !out) return kst_fail(err, KST_ERR_INVALID, "kst_store_bm25: NULL argument");
    *out = NULL;
    char *expr = NULL;
    int rc = kst_store_fts_query(query, &expr, err);
    if (rc != KST_OK) return rc;
    size_t cap = k < 64 ? k : 64;
    kst_store_hits *h = kst_malloc(1, sizeof *h + cap * sizeof h->hit[0], "BM25 hits", err);
    if (!h) {
        kst_free(expr);
        return KST_ERR_NOMEM;
    }
    h->n = 0;
    if (!expr[0] || k == 0) goto finish; /* no words: no hits, not an error */

    sqlite3_stmt *st = s->st[ST_BM25];
    sqlite3_bind_text(st, 1, expr, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 2, k > (size_t)INT64_MAX ? INT64_MAX : (sqlite3_int64)k);
    int src;
    while ((src = sqlite3_step(st)) == SQLITE_ROW) {
        if (h->n == cap) {
            size_t ncap = cap * 2 < k ? cap * 2 : k;
            void *p = h;
            rc = kst_realloc(&p, 1, sizeof *h + ncap * sizeof h->hit[0], "BM25 hits", err);
            if (rc != KST_OK) break;
            h = p;
            cap = ncap;
        }
        h->hit[h->n].id = sqlite3_column_int64(st, 0);
        h->hit[h->n].score = -sqlite3_column_double(st, 1);
        h->n++;
    }
    if (rc == KST_OK && src != SQLITE_DONE) rc = sql_fail(s, err, src, "BM25 search");
    reset_stmt(st);
finish:
    kst_free(expr);
    if (rc != KST_OK) {
        kst_free(h);
        return rc;
    }
    *out = h;
    return KST_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* Manifest                                                                                   */
/* ------------------------------------------------------------------------------------------ */

int kst_store_manifest_read(kst_store *s, kst_store_manifest *out, kst_error *err) {
    if (!s || !out) return kst_fail(err, KST_ERR_INVALID, "kst_store_manifest_read: NULL argument");
    memset(out, 0, sizeof *out);
    out->schema_version = KST_STORE_SCHEMA_VERSION;
    sqlite3_stmt *st = s->st[ST_META_ALL];
    int src, rc = KST_OK;
    while ((src = sqlite3_step(st)) == SQLITE_ROW) {
        const char *key = (const char *)sqlite3_column_text(st, 0);
        const char *val = (const char *)sqlite3_column_text(st, 1);
        if (!key) continue;
        if (!strcmp(key, "model_fingerprint"))
            snprintf(out->model_fingerprint, sizeof out->model_fingerprint, "%s", val ? val : "");
        else if (!strcmp(key, "faiss_factory"))
            snprintf(out->faiss_factory, sizeof out->faiss_factory, "%s", val ? val : "");
        else if (!strcmp(key, "dims"))
            out->dims = (long)sqlite3_column_int64(st, 1);
        else if (!strcmp(key, "doc_count"))
            out->doc_count = sqlite3_column_int64(st, 1);
        else if (!strcmp(key, "generation"))
            out->generation = sqlite3_column_int64(st, 1);
    }
    if (src != SQLITE_DONE) rc = sql_fail(s, err, src, "reading the manifest");
    reset_stmt(st);
    return rc;
}

static int meta_put(kst_store *s, const char *key, const char *text, int64_t num, int is_num,
                    kst_error *err) {
    sqlite3_stmt *st = s->st[ST_META_SET];
    sqlite3_bind_text(st, 1, key, -1, SQLITE_STATIC);
    if (is_num)
        sqlite3_bind_int64(st, 2, num);
    else
        sqlite3_bind_text(st, 2, text, -1, SQLITE_STATIC);
    int src = sqlite3_step(st);
    reset_stmt(st);
    if (src != SQLITE_DONE) return sql_fail(s, err, src, "writing the manifest");
    s->dirty = 1;
    return KST_OK;
}

static int is_hex64(const char *f) {
    if (!f || strlen(f) != 64) return 0;
    for (size_t i = 0; i < 64; i++)
        if (!((f[i] >= '0' && f[i] <= '9') || (f[i] >= 'a' && f[i] <= 'f'))) return 0;
    return 1;
}

int kst_store_set_model(kst_store *s, const char *fingerprint, long dims, const char *factory,
                        kst_error *err) {
    int rc = need_write(s, "kst_store_set_model", err);
    if (rc != KST_OK) return rc;
    if (!is_hex64(fingerprint))
        return kst_fail(err, KST_ERR_INVALID, "%s: model fingerprint \"%.80s\" is not 64 "
                        "lowercase hex digits (a sha256)", s->path, fingerprint ? fingerprint : "");
    if (dims <= 0)
        return kst_fail(err, KST_ERR_INVALID, "%s: model dims %ld, expected > 0", s->path, dims);
    if (factory && strlen(factory) >= KST_STORE_FACTORY_MAX)
        return kst_fail(err, KST_ERR_INVALID, "%s: FAISS factory string of %zu bytes, at most %d",
                        s->path, strlen(factory), KST_STORE_FACTORY_MAX - 1);
    rc = meta_put(s, "model_fingerprint", fingerprint, 0, 0, err);
    if (rc == KST_OK) rc = meta_put(s, "dims", NULL, dims, 1, err);
    if (rc == KST_OK && factory) rc = meta_put(s, "faiss_factory", factory, 0, 0, err);
    return rc;
}

int kst_store_check_model(kst_store *s, const char *fingerprint, kst_error *err) {
    kst_store_manifest m;
    int rc = kst_store_manifest_read(s, &m, err);
    if (rc != KST_OK) return rc;
    if (!m.model_fingerprint[0])
        return kst_fail(err, KST_ERR_INVALID, "%s: the index was built without a model (BM25 "
                        "only); rebuild it with --model to use dense search", s->path);
    if (!fingerprint || strcmp(fingerprint, m.model_fingerprint) != 0)
        return kst_fail(err, KST_ERR_INVALID, "%s: the index was built with the model of "
                        "fingerprint %s, but the model given has fingerprint %s; rebuild the "
                        "index with this model or pass the model it was built with", s->path,
                        m.model_fingerprint, fingerprint ? fingerprint : "(none)");
    return KST_OK;
}

int kst_store_meta_get(kst_store *s, const char *key, char **out, kst_error *err) {
    if (!s || !key || !out) return kst_fail(err, KST_ERR_INVALID, "kst_store_meta_get: NULL argument");
    *out = NULL;
    sqlite3_stmt *st = s->st[ST_META_GET];
    sqlite3_bind_text(st, 1, key, -1, SQLITE_STATIC);
    int src = sqlite3_step(st), rc = KST_OK;
    if (src == SQLITE_ROW) {
        const unsigned char *v = sqlite3_column_text(st, 0);
        *out = kst_strndup(v ? (const char *)v : "", v ? (size_t)sqlite3_column_bytes(st, 0) : 0,
                           err);
        if (!*out) rc = KST_ERR_NOMEM;
    } else if (src == SQLITE_DONE) {
        rc = kst_fail(err, KST_ERR_NOTFOUND, "%s: manifest has no \"%s\"", s->path, key);
    } else {
        rc = sql_fail(s, err, src, "reading the manifest");
    }
    reset_stmt(st);
    return rc;
}

int kst_store_meta_set(kst_store *s, const char *key, const char *value, kst_error *err) {
    int rc = need_write(s, "kst_store_meta_set", err);
    if (rc != KST_OK) return rc;
    if (!key || !*key || !value)
        return kst_fail(err, KST_ERR_INVALID, "%s: manifest key and value must be set", s->path);
    if (!strcmp(key, "doc_count") || !strcmp(key, "generation"))
        return kst_fail(err, KST_ERR_INVALID, "%s: manifest \"%s\" is kept by the store itself",
                        s->path, key);
    return meta_put(s, key, value, 0, 0, err);
}

/* ------------------------------------------------------------------------------------------ */
/* Fingerprint                                                                                */
/* ------------------------------------------------------------------------------------------ */

int kst_store_fingerprint_files(const char *const *paths, size_t n, char hex_out[65],
                                kst_error *err) {
    if (!hex_out) return kst_fail(err, KST_ERR_INVALID, "fingerprint: NULL output");
    if (n == 0) return kst_fail(err, KST_ERR_INVALID, "fingerprint: no model weight files given");
    unsigned char d[KST_SHA256_LEN];
    int rc = kst_sha256_files(paths, n, d, err);
    if (rc == KST_OK) kst_sha256_hex(d, hex_out);
    return rc;
}

/* ------------------------------------------------------------------------------------------ */
/* ColBERT token rows                                                                         */
/* ------------------------------------------------------------------------------------------ */

int kst_store_set_tokens(kst_store *s, int64_t id, uint64_t first, uint64_t count, kst_error *err) {
    if (!s->in_write)
        return kst_fail(err, KST_ERR_MISUSE, "%s: kst_store_set_tokens outside a transaction", s->path);
    sqlite3_stmt *st = s->st[ST_TOK_SET];
    sqlite3_bind_int64(st, 1, id);
    sqlite3_bind_int64(st, 2, (sqlite3_int64)first);
    sqlite3_bind_int64(st, 3, (sqlite3_int64)count);
    int src = sqlite3_step(st);
    int rc = src == SQLITE_DONE ? KST_OK : sql_fail(s, err, src, "recording token rows");
    reset_stmt(st);
    return rc;
}

int kst_store_get_tokens(kst_store *s, int64_t id, uint64_t *first, uint64_t *count, kst_error *err) {
    sqlite3_stmt *st = s->st[ST_TOK_GET];
    sqlite3_bind_int64(st, 1, id);
    int src = sqlite3_step(st), rc = KST_OK;
    if (src == SQLITE_ROW) {
        *first = (uint64_t)sqlite3_column_int64(st, 0);
        *count = (uint64_t)sqlite3_column_int64(st, 1);
    } else if (src == SQLITE_DONE) {
        rc = kst_fail(err, KST_ERR_NOTFOUND, "%s: document %lld has no token vectors", s->path, (long long)id);
    } else {
        rc = sql_fail(s, err, src, "reading token rows");
    }
    reset_stmt(st);
    return rc;
}
