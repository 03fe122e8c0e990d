/* teacher.h - streamed teacher-score readers for distillation: each record is a query text and
 * n >= 2 passage texts with teacher scores, the first passage the positive.
 *
 * Formats (one record per line; lines empty or only white space are skipped):
 *   KST_TEACHER_HOFSTAETTER  pos_score<TAB>neg_score<TAB>qid<TAB>pos_pid<TAB>neg_pid
 *                            (Hofstaetter et al.'s MS MARCO teacher files); ids resolved through
 *                            a queries map and a collection map (kst_textmap). n = 2.
 *   KST_TEACHER_MATCHMAKER   pos_score<TAB>neg_score<TAB>query<TAB>pos_text<TAB>neg_text
 *                            (matchmaker's text form); texts inline. n = 2.
 *   KST_TEACHER_NWAY         [qid, [pid, score], [pid, score], ...] (ColBERTv2 n-way JSONL);
 *                            ids are JSON strings or integers, resolved through the two maps.
 *                            opts.nway = 0 takes every pair and requires every line to have as
 *                            many as the first record; opts.nway = k takes the first k pairs (as
 *                            ColBERT's LazyBatcher) and requires at least k.
 * Any kst_stream_open input works (file, gzip, "-", http(s) URL). The teacher file is streamed:
 * the reader holds only the shuffle buffer, never the whole file.
 *
 * Errors: every malformed line stops the reader with KST_ERR_FORMAT and a message naming the
 * file, the line and what was expected: a missing or extra column (named), a score that is not
 * a number, NaN or infinite, or out of float range, an unknown qid/pid (named, with the map's
 * file), invalid JSON, a pair that is not [pid, score]. A teacher file with no records is an
 * error ("has no training rows") at open. Errors are sticky: later calls fail the same way.
 *
 * Shuffling: a buffer of K records (opts.shuffle_buffer). At open the reader fills it with the
 * first K records; each next draws a uniform slot j of those held, hands that record out, and
 * refills slot j with the next record of the file (at the end of the file slot j takes the last
 * held record and the buffer shrinks). K <= 1 or opts.no_shuffle gives the records in file order.
 * The random numbers come from kst_xoshiro (xoshiro256** seeded through splitmix64), so a seed gives
 * the same order on every machine.
 *
 * Resuming: kst_teacher_state writes the position as JSON text (format below); opening with that
 * text as `resume` yields exactly the records an uninterrupted reader would have yielded next.
 * The reader re-reads the file's lines up to the saved position without parsing them (a linear
 * scan, also through gzip and URLs), parsing only the lines held in the buffer.
 *
 *   {"version": 1, "format": "hofstaetter", "shuffle_buffer": K, "nway": n,
 *    "lines_read": L, "records_read": R, "records_emitted": E,
 *    "rng": ["<16 hex digits>" x 4], "buffer": [line, line, ...]}
 *
 * lines_read: lines taken from the teacher file so far; buffer: the file line number (1-based)
 * of the record in each buffer slot, in slot order; rng: the xoshiro256** state words; nway: the
 * passages per record in use. The format and shuffle_buffer must match the opening options.
 *
 * A reader is used by one thread at a time; text maps are read-only once loaded and may be
 * shared by any number of readers and threads. */
#ifndef KST_TRAIN_TEACHER_H
#define KST_TRAIN_TEACHER_H

#include <stddef.h>
#include <stdint.h>

#include "core/error.h"

/* ---------------------------------------------------------------------------------------------
 * Random numbers: xoshiro256** 1.0 (Blackman and Vigna, https://prng.di.unimi.it/), its 256-bit
 * state filled from a 64-bit seed by four outputs of splitmix64 (as the authors recommend).
 * ------------------------------------------------------------------------------------------- */

typedef struct kst_xoshiro {
    uint64_t s[4];
} kst_xoshiro;

/* Seeds the generator (any seed, 0 included, gives a valid non-zero state). */
void kst_xoshiro_seed(kst_xoshiro *r, uint64_t seed);
/* Next 64 random bits. */
uint64_t kst_xoshiro_next(kst_xoshiro *r);
/* Uniform integer in [0, k) for k >= 1, without modulo bias: draws are rejected below
 * 2^64 mod k, then reduced mod k. */
uint64_t kst_xoshiro_below(kst_xoshiro *r, uint64_t k);

/* ---------------------------------------------------------------------------------------------
 * Id -> text maps (queries.tsv, collection.tsv, or BEIR JSONL through index/collection.h)
 * ------------------------------------------------------------------------------------------- */

typedef struct kst_textmap kst_textmap;

/* Loads every record of `path` (queries = 1: a kst_queries file, qid<TAB>text or BEIR queries;
 * 0: a kst_docs file, pid<TAB>text, pid<TAB>title<TAB>text, BEIR or Pyserini corpus; a title is
 * joined to the text with one space). Ids and texts are kept in large blocks (one allocation per
 * 64 MiB, so an 8.8M-passage collection is a few hundred allocations), plus a 24-byte entry and a
 * 4-byte hash slot per record. A duplicate id is KST_ERR_FORMAT naming the id and its line.
 * *out (OUT) is freed with kst_textmap_free; NULL on failure. */
int kst_textmap_load(const char *path, int queries, kst_textmap **out, kst_error *err);
/* Looks up id (id_len bytes). Returns 1 and sets *text, *len (valid while the map lives), or 0. */
int kst_textmap_find(const kst_textmap *m, const char *id, size_t id_len, const char **text,
                     size_t *len);
size_t kst_textmap_count(const kst_textmap *m);
/* The file it was loaded from (for messages). */
const char *kst_textmap_path(const kst_textmap *m);
/* NULL is a no-op. */
void kst_textmap_free(kst_textmap *m);

/* ---------------------------------------------------------------------------------------------
 * Teacher readers
 * ------------------------------------------------------------------------------------------- */

typedef enum kst_teacher_format {
    KST_TEACHER_HOFSTAETTER = 1,
    KST_TEACHER_MATCHMAKER,
    KST_TEACHER_NWAY,
} kst_teacher_format;

/* "hofstaetter", "matchmaker", "nway"; "?" for others. */
const char *kst_teacher_format_name(kst_teacher_format f);
/* Parses a name above into *out; KST_ERR_INVALID names the accepted ones. */
int kst_teacher_format_parse(const char *name, kst_teacher_format *out, kst_error *err);

typedef struct kst_teacher_opts {
    kst_teacher_format format;
    const kst_textmap *queries;    /* borrowed; required by HOFSTAETTER and NWAY */
    const kst_textmap *collection; /* borrowed; required by HOFSTAETTER and NWAY */
    size_t shuffle_buffer;         /* K records held for shuffling; 0 or 1: file order */
    int no_shuffle;                /* 1: file order whatever shuffle_buffer says */
    uint64_t seed;                 /* shuffle seed */
    size_t nway;                   /* NWAY only: 0 = all pairs (same count on every line) */
} kst_teacher_opts;

/* One record. Pointers stay valid until the next kst_teacher_next or kst_teacher_close (texts
 * from a map live as long as the map). Lengths count bytes without the NUL. */
typedef struct kst_teacher_record {
    const char *query;
    size_t query_len;
    size_t n;                          /* passages, >= 2 */
    const char *const *passages;       /* (n) passages[0] is the positive */
    const size_t *passage_lens;        /* (n) */
    const float *scores;               /* (n) teacher scores, finite */
    size_t line;                       /* line of the teacher file it came from */
} kst_teacher_record;

typedef struct kst_teacher kst_teacher;

/* Opens the teacher file `path` with opts (IN, copied; the maps stay borrowed). resume (IN) is
 * NULL for a fresh start or a kst_teacher_state text to continue from. Fills the shuffle buffer,
 * so errors in the first K records, an empty file, or a resume state that does not fit the file
 * (fewer lines, a buffered line that is not a record, other options) fail here. *out (OUT) is
 * closed with kst_teacher_close; NULL on failure. */
int kst_teacher_open(const char *path, const kst_teacher_opts *opts, const char *resume,
                     kst_teacher **out, kst_error *err);
/* Next record into *rec (OUT): KST_OK with rec->query set, or KST_OK with rec->query == NULL
 * once every record has been handed out (then again on every call). On failure rec->query is
 * NULL and err names the file and line. */
int kst_teacher_next(kst_teacher *r, kst_teacher_record *rec, kst_error *err);
/* Writes the current position as NUL-terminated JSON into *json (OUT, free with kst_free).
 * Fails only for memory (KST_ERR_NOMEM) or on a reader that has failed (KST_ERR_MISUSE). */
int kst_teacher_state(const kst_teacher *r, char **json, kst_error *err);
/* Records handed out so far (counting those before a resume). */
size_t kst_teacher_emitted(const kst_teacher *r);
/* NULL is a no-op; does not free the maps. */
void kst_teacher_close(kst_teacher *r);

#endif
