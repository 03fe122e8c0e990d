/* vocab.h - WordPiece vocabulary: token strings by id and an open-addressing hash from token to id.
 *
 * Internal to encoders/. The tokenizer owns one kst_vocab; it is read-only once loaded, so any
 * number of threads may look tokens up at once. */
#ifndef KST_ENCODERS_VOCAB_H
#define KST_ENCODERS_VOCAB_H

#include <stddef.h>
#include <stdint.h>

#include <cjson/cJSON.h>

#include "core/error.h"
#include "encoders/tokenizer.h"

typedef struct kst_vocab {
    char *text;        /* every token, each followed by a NUL; owned */
    uint32_t *offset;  /* (n) where token id starts in text */
    uint32_t *len;     /* (n) its length in bytes */
    int32_t *slots;    /* (mask + 1) token id, or -1 for an empty slot */
    size_t n;          /* number of tokens; ids are 0 .. n-1 */
    size_t mask;       /* slot count - 1 (a power of two, at least twice n) */
    size_t max_len;    /* longest token in bytes: WordPiece never tries a longer piece */
} kst_vocab;

/* Reads vocab.txt: one token per line, id = line number - 1; LF or CRLF endings, the final newline
 * optional. An empty line, a duplicate token or invalid UTF-8 is KST_ERR_FORMAT naming `path` and
 * the line; a file with no tokens is KST_ERR_FORMAT too. On failure *v is left zeroed. */
int kst_vocab_read_txt(kst_vocab *v, const char *path, kst_error *err);

/* Builds the vocabulary from tokenizer.json's "model.vocab" object (token -> id). The ids must be
 * exactly 0 .. n-1, each once; anything else is KST_ERR_FORMAT naming `where`. On failure *v is left
 * zeroed. */
int kst_vocab_from_json(kst_vocab *v, const cJSON *vocab, const char *where, kst_error *err);

/* Id of the token spelled prefix[0..plen) followed by s[0..slen), or -1. prefix may be NULL when
 * plen is 0. Lets WordPiece look up "##" + piece without copying the piece. */
int32_t kst_vocab_find(const kst_vocab *v, const char *prefix, size_t plen, const char *s,
                       size_t slen);

/* Frees what the vocabulary owns and zeroes it; a zeroed vocabulary is a no-op. */
void kst_vocab_free(kst_vocab *v);

/* ---------------------------------------------------------------------------------------------
 * A checkpoint folder's tokenizer files, read but not yet turned into a tokenizer
 * ------------------------------------------------------------------------------------------- */

enum { KST_SP_CLS, KST_SP_SEP, KST_SP_PAD, KST_SP_UNK, KST_SP_MASK, KST_SP_COUNT };

/* A string matched in raw text before normalisation, as tokenizers' added tokens are. */
typedef struct kst_added_token {
    char *text; /* owned */
    size_t len;
    int32_t id;
} kst_added_token;

typedef struct kst_tokenizer_files {
    kst_vocab vocab;
    kst_tokenizer_opts opts;
    char prefix[16];                /* continuing_subword_prefix ("##") */
    char *special[KST_SP_COUNT];    /* special token strings (owned), NULL for the default */
    kst_added_token *added;         /* (n_added) tokenizer.json's added_tokens, owned */
    size_t n_added;
    size_t model_max_length;        /* 0 when absent or >= 1e6 */
} kst_tokenizer_files;

/* Reads `dir`: the vocabulary from vocab.txt, else from tokenizer.json's WordPiece model; the
 * normaliser from tokenizer_config.json when present (with BertTokenizer's defaults for absent
 * keys, as transformers does, which then ignores tokenizer.json's normalizer), else from
 * tokenizer.json's BertNormalizer. Errors name the file and what was expected; a folder with
 * neither vocabulary file is KST_ERR_NOTFOUND, a model other than WordPiece KST_ERR_UNSUPPORTED.
 * On failure *f is left zeroed. */
int kst_tokenizer_files_read(const char *dir, kst_tokenizer_files *f, kst_error *err);
/* Frees what *f owns and zeroes it; a zeroed one is a no-op. */
void kst_tokenizer_files_free(kst_tokenizer_files *f);

#endif
