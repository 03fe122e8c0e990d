/* tokenizer.h - BERT WordPiece tokenization exactly as Hugging Face's BertTokenizer(Fast). */
#ifndef KST_ENCODERS_TOKENIZER_H
#define KST_ENCODERS_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

#include "core/error.h"

typedef struct kst_tokenizer kst_tokenizer;

/* Normalisation settings; kst_tokenizer_opts_default() gives bert-base-uncased's. */
typedef struct kst_tokenizer_opts {
    int do_lower_case;          /* 1: lower-case (and strip accents unless strip_accents == 0) */
    int strip_accents;          /* -1: follow do_lower_case; 0: keep; 1: strip */
    int tokenize_chinese_chars; /* 1: each CJK ideograph becomes its own word */
    int clean_text;             /* 1: drop control chars and U+FFFD, whitespace to ' ' */
    size_t max_input_chars_per_word; /* longer words become [UNK] (100) */
} kst_tokenizer_opts;

kst_tokenizer_opts kst_tokenizer_opts_default(void);

/* Loads the tokenizer of a checkpoint folder: the vocabulary from vocab.txt, or from
 * tokenizer.json's WordPiece model when there is no vocab.txt; settings from
 * tokenizer_config.json (do_lower_case, strip_accents, tokenize_chinese_chars, special tokens,
 * model_max_length) and tokenizer.json's normalizer when present. Errors name the file and what
 * was expected. Free with kst_tokenizer_free. */
int kst_tokenizer_load(const char *dir, kst_tokenizer **out, kst_error *err);
/* Loads a bare vocab.txt (one token per line, id = line number - 1) with the given options
 * (NULL: defaults). */
int kst_tokenizer_from_vocab(const char *vocab_path, const kst_tokenizer_opts *opts,
                             kst_tokenizer **out, kst_error *err);
/* NULL is a no-op. */
void kst_tokenizer_free(kst_tokenizer *t);

/* A growable list of token ids with their token type ids. Zero-initialise before first use;
 * kst_ids_free releases it. */
typedef struct kst_ids {
    int32_t *ids;
    int32_t *type_ids;
    size_t len, cap;
} kst_ids;
void kst_ids_free(kst_ids *v);

/* Tokenizes `len` bytes of `text` (any bytes: invalid UTF-8 is decoded as Python's
 * errors="replace" would, then U+FFFD is dropped by text cleaning) into WordPiece ids without
 * special tokens, appending to *out with type id 0. Fails only on memory. */
int kst_tokenize(const kst_tokenizer *t, const char *text, size_t len, kst_ids *out,
                 kst_error *err);

/* Builds the model input: [CLS] a [SEP] for one text, [CLS] a [SEP] b [SEP] for a pair (b != NULL)
 * with token_type_ids 0 for the first segment and 1 for the second. When max_len > 0 the result is
 * truncated to max_len tokens: a single text loses its tail; a pair uses Hugging Face's
 * "longest_first" strategy (remove one token at a time from the longer segment, from the second
 * when equal). *out is reset first. As in transformers, an empty b (blen == 0) counts as no pair,
 * and tokenizers' longest_first splits the budget in one step (when both segments must shrink,
 * each keeps half and the longer one the odd token), which can differ by one token from the
 * one-at-a-time description above; we match BertTokenizerFast. max_len below the number of special
 * tokens (2, or 3 for a pair) is KST_ERR_INVALID. */
int kst_tokenizer_encode(const kst_tokenizer *t, const char *a, size_t alen, const char *b,
                         size_t blen, size_t max_len, kst_ids *out, kst_error *err);

/* Id of an exact vocabulary entry, or -1. */
int32_t kst_token_id(const kst_tokenizer *t, const char *token);
/* The vocabulary entry of an id, or NULL when out of range. */
const char *kst_token_str(const kst_tokenizer *t, int32_t id);
size_t kst_tokenizer_vocab_size(const kst_tokenizer *t);

/* Special token ids (-1 when the vocabulary lacks them). */
typedef struct kst_special_ids {
    int32_t cls, sep, pad, unk, mask;
} kst_special_ids;
kst_special_ids kst_tokenizer_special(const kst_tokenizer *t);
/* model_max_length from tokenizer_config.json, 0 when absent or absurd (>= 1e6). */
size_t kst_tokenizer_model_max_length(const kst_tokenizer *t);

/* The options in force (after tokenizer_config.json / tokenizer.json); defaults for NULL. */
kst_tokenizer_opts kst_tokenizer_get_opts(const kst_tokenizer *t);

/* The normalised, pre-tokenized words of `len` bytes of text (what WordPiece then splits), joined
 * by single spaces, into a NUL-terminated buffer *out the caller frees with kst_free (*out_len,
 * which may be NULL, gets its length). Added tokens such as [SEP] written in the text appear as
 * themselves. For tests and debugging. Fails only on memory. */
int kst_tokenizer_pretokenize(const kst_tokenizer *t, const char *text, size_t len, char **out,
                              size_t *out_len, kst_error *err);

#endif
