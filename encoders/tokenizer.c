/* tokenizer.c - BERT WordPiece tokenization matching Hugging Face's BertTokenizerFast.
 *
 * The pipeline follows the `tokenizers` crate (BertNormalizer, BertPreTokenizer, WordPiece,
 * BertProcessing), which is what BertTokenizerFast (transformers 5's BertTokenizer) runs. Where the
 * slow Python BertTokenizer (transformers 5's BertTokenizerLegacy) differs, we follow Fast; the
 * differences are listed beside the code that makes the choice:
 *   - lower-casing is per character (Rust char::to_lowercase): no final-sigma rule, U+0130 becomes
 *     "i" + U+0307; the slow one uses Python's str.lower(), which maps a word-final Σ to ς;
 *   - accents are stripped before lower-casing, and there is no NFC pass first (slow: NFC, lower,
 *     then NFD and strip);
 *   - pair truncation ("longest_first") splits the budget as tokenizers' truncate_encodings does,
 *     which can differ by one token from the slow one-at-a-time loop;
 *   - unassigned code points (Cn) are kept (slow drops every C* category);
 *   - U+2B820..U+2B91F are not isolated as CJK (a typo in tokenizers' range table);
 *   - an empty second text makes a single-text encoding (Fast; slow adds an empty segment).
 * Fast's character tables are older than utf8proc's (Unicode 15); LEGACY_PLAIN below bridges the
 * gap. A sweep of every code point through both agrees except for 55 capitals new in Unicode 16,
 * which Rust lower-cases and utf8proc 2.8 does not yet know. tests/fixtures/tokenizer/
 * disagreements.txt lists the fixture cases where Fast and slow differ.
 * Each piece of text is processed in one pass: decode, clean, normalise, split into words, and
 * WordPiece each word as it ends, with no allocation per character or per word. */
#include "encoders/tokenizer.h"

#include <stdint.h>
#include <string.h>

#include <utf8proc.h>

#include "core/check.h"
#include "core/file.h"
#include "core/json.h"
#include "core/mem.h"
#include "encoders/vocab.h"

/* ---------------------------------------------------------------------------------------------
 * Types
 * ------------------------------------------------------------------------------------------- */

static const char *const SPECIAL_DEFAULT[KST_SP_COUNT] = {"[CLS]", "[SEP]", "[PAD]", "[UNK]",
                                                          "[MASK]"};

/* What an ASCII byte does after cleaning and normalisation. */
enum { AC_CHAR, AC_SPACE, AC_PUNCT, AC_DROP };

struct kst_tokenizer {
    kst_tokenizer_files f;      /* vocabulary, options, special strings, added tokens */
    int strip;                  /* accents stripped: opts.strip_accents resolved */
    size_t prefix_len;
    const char *special[KST_SP_COUNT]; /* special token strings (f's or the defaults) */
    kst_special_ids ids;        /* their ids, -1 when absent */
    kst_added_token *added;     /* (n_added) matched in raw text, longest first; owned */
    size_t n_added;
    unsigned char added_first[256]; /* 1 when some added token starts with this byte */
    unsigned char ascii_class[128];
    char ascii_map[128];        /* the byte an AC_CHAR becomes (lower-cased or not) */
};

kst_tokenizer_opts kst_tokenizer_opts_default(void) {
    kst_tokenizer_opts o = {.do_lower_case = 1,
                            .strip_accents = -1,
                            .tokenize_chinese_chars = 1,
                            .clean_text = 1,
                            .max_input_chars_per_word = 100};
    return o;
}

/* ---------------------------------------------------------------------------------------------
 * Character classes (tokenizers' normalizers/bert.rs and pre_tokenizers/bert.rs)
 * ------------------------------------------------------------------------------------------- */

/* Rust's char::is_whitespace, the Unicode White_Space property. Python's _is_whitespace (Zs and
 * \t\n\r) differs only on U+2028/U+2029, which Python's str.split() then splits on anyway, and on
 * U+0085, U+000B and U+000C, which cleaning drops first as controls. */
static inline int is_space(int32_t c) {
    if (c < 0x80) return c == ' ' || (c >= 0x09 && c <= 0x0d);
    return c == 0x85 || c == 0xa0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200a) || c == 0x2028 ||
           c == 0x2029 || c == 0x202f || c == 0x205f || c == 0x3000;
}

/* What clean_text drops besides NUL and U+FFFD: tokenizers' is_control, the "Other" categories
 * Cc, Cf, Co and Cs, except \t \n \r, which are whitespace. Unassigned code points (Cn) are kept,
 * as Fast keeps them (its Unicode tables list only assigned characters); the slow tokenizer drops
 * them, since Python's category() starts with "C". */
static inline int is_control(int32_t c) {
    if (c == '\t' || c == '\n' || c == '\r') return 0;
    switch (utf8proc_category(c)) {
    case UTF8PROC_CATEGORY_CC:
    case UTF8PROC_CATEGORY_CF:
    case UTF8PROC_CATEGORY_CS:
    case UTF8PROC_CATEGORY_CO:
        return 1;
    default:
        return 0;
    }
}

static inline int is_punct_ascii(int c) {
    return (c >= 33 && c <= 47) || (c >= 58 && c <= 64) || (c >= 91 && c <= 96) ||
           (c >= 123 && c <= 126);
}

/* ASCII punctuation (which includes $ + < = > ^ ` | ~, symbols in Unicode) or any P* category. */
static inline int is_punct(int32_t c) {
    if (c < 0x80) return is_punct_ascii(c);
    if (c == 0x166d || c == 0x111c9) return 1; /* Po in tokenizers' older tables, now So / Mn */
    switch (utf8proc_category(c)) {
    case UTF8PROC_CATEGORY_PC:
    case UTF8PROC_CATEGORY_PD:
    case UTF8PROC_CATEGORY_PS:
    case UTF8PROC_CATEGORY_PE:
    case UTF8PROC_CATEGORY_PI:
    case UTF8PROC_CATEGORY_PF:
    case UTF8PROC_CATEGORY_PO:
        return 1;
    default:
        return 0;
    }
}

/* The CJK Unified Ideographs blocks of BERT's _is_chinese_char (not Hangul, kana or CJK
 * punctuation, which the original code deliberately leaves alone). tokenizers' copy of the list
 * starts Extension E at 0x2B920, not 0x2B820, so U+2B820..U+2B91F are not isolated by Fast (the
 * slow tokenizer isolates them); we follow Fast. */
static inline int is_cjk(int32_t c) {
    return (c >= 0x4e00 && c <= 0x9fff) || (c >= 0x3400 && c <= 0x4dbf) ||
           (c >= 0x20000 && c <= 0x2a6df) || (c >= 0x2a700 && c <= 0x2b73f) ||
           (c >= 0x2b740 && c <= 0x2b81f) || (c >= 0x2b920 && c <= 0x2ceaf) ||
           (c >= 0xf900 && c <= 0xfaff) || (c >= 0x2f800 && c <= 0x2fa1f);
}

/* Characters that utf8proc (Unicode 15) calls punctuation, format (Cf) or nonspacing marks (Mn)
 * but that tokenizers' older Unicode tables (the unicode_categories crate) do not know, so Fast
 * treats them as ordinary letters: never split off, dropped or stripped. Mostly scripts and signs
 * added in Unicode 10 to 15. Found by running every code point through both (tokenizers 0.23);
 * the code point fixture checks a sample. Sorted, inclusive. */
static const int32_t LEGACY_PLAIN[][2] = {
    {0x61D, 0x61D}, {0x7FD, 0x7FD}, {0x890, 0x891}, {0x898, 0x89F}, {0x8CA, 0x8E2}, {0x9FD, 0x9FE},
    {0xA76, 0xA76}, {0xAFA, 0xAFF}, {0xB55, 0xB55}, {0xC04, 0xC04}, {0xC3C, 0xC3C}, {0xC77, 0xC77},
    {0xC84, 0xC84}, {0xD00, 0xD00}, {0xD3B, 0xD3C}, {0xD81, 0xD81}, {0xEBA, 0xEBA}, {0xECE, 0xECE},
    {0x180F, 0x180F}, {0x1885, 0x1886}, {0x1ABF, 0x1ACE}, {0x1B7D, 0x1B7E}, {0x1DF6, 0x1DFB},
    {0x2E43, 0x2E4F}, {0x2E52, 0x2E5D}, {0xA82C, 0xA82C}, {0xA8C5, 0xA8C5}, {0xA8FF, 0xA8FF},
    {0xA9BD, 0xA9BD}, {0x10D24, 0x10D27}, {0x10EAB, 0x10EAD}, {0x10EFD, 0x10EFF},
    {0x10F46, 0x10F50}, {0x10F55, 0x10F59}, {0x10F82, 0x10F89}, {0x11070, 0x11070},
    {0x11073, 0x11074}, {0x110C2, 0x110C2}, {0x110CD, 0x110CD}, {0x111CF, 0x111CF},
    {0x1123E, 0x1123E}, {0x11241, 0x11241}, {0x1133B, 0x1133B}, {0x11438, 0x1143F},
    {0x11442, 0x11444}, {0x11446, 0x11446}, {0x1144B, 0x1144F}, {0x1145A, 0x1145B},
    {0x1145D, 0x1145E}, {0x11660, 0x1166C}, {0x116B9, 0x116B9}, {0x1182F, 0x11837},
    {0x11839, 0x1183B}, {0x11938, 0x11938}, {0x1193B, 0x1193C}, {0x1193E, 0x1193E},
    {0x11943, 0x11946}, {0x119D4, 0x119D7}, {0x119DA, 0x119DB}, {0x119E0, 0x119E0},
    {0x119E2, 0x119E2}, {0x11A01, 0x11A0A}, {0x11A33, 0x11A38}, {0x11A3B, 0x11A47},
    {0x11A51, 0x11A56}, {0x11A59, 0x11A5B}, {0x11A8A, 0x11A96}, {0x11A98, 0x11A9C},
    {0x11A9E, 0x11AA2}, {0x11B00, 0x11B09}, {0x11C30, 0x11C36}, {0x11C38, 0x11C3D},
    {0x11C3F, 0x11C3F}, {0x11C41, 0x11C45}, {0x11C70, 0x11C71}, {0x11C92, 0x11CA7},
    {0x11CAA, 0x11CB0}, {0x11CB2, 0x11CB3}, {0x11CB5, 0x11CB6}, {0x11D31, 0x11D36},
    {0x11D3A, 0x11D3A}, {0x11D3C, 0x11D3D}, {0x11D3F, 0x11D45}, {0x11D47, 0x11D47},
    {0x11D90, 0x11D91}, {0x11D95, 0x11D95}, {0x11D97, 0x11D97}, {0x11EF3, 0x11EF4},
    {0x11EF7, 0x11EF8}, {0x11F00, 0x11F01}, {0x11F36, 0x11F3A}, {0x11F40, 0x11F40},
    {0x11F42, 0x11F4F}, {0x11FFF, 0x11FFF}, {0x12FF1, 0x12FF2}, {0x13430, 0x13440},
    {0x13447, 0x13455}, {0x16E97, 0x16E9A}, {0x16F4F, 0x16F4F}, {0x16FE2, 0x16FE2},
    {0x16FE4, 0x16FE4}, {0x1CF00, 0x1CF2D}, {0x1CF30, 0x1CF46}, {0x1E000, 0x1E006},
    {0x1E008, 0x1E018}, {0x1E01B, 0x1E021}, {0x1E023, 0x1E024}, {0x1E026, 0x1E02A},
    {0x1E08F, 0x1E08F}, {0x1E130, 0x1E136}, {0x1E2AE, 0x1E2AE}, {0x1E2EC, 0x1E2EF},
    {0x1E4EC, 0x1E4EF}, {0x1E944, 0x1E94A}, {0x1E95E, 0x1E95F},
};

static int is_legacy_plain(int32_t c) {
    size_t lo = 0, hi = sizeof LEGACY_PLAIN / sizeof LEGACY_PLAIN[0];
    if (c < LEGACY_PLAIN[0][0]) return 0;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (c < LEGACY_PLAIN[mid][0])
            hi = mid;
        else if (c > LEGACY_PLAIN[mid][1])
            lo = mid + 1;
        else
            return 1;
    }
    return 0;
}

static void build_ascii_tables(kst_tokenizer *t) {
    for (int c = 0; c < 128; c++) {
        unsigned char cls = AC_CHAR;
        if (t->f.opts.clean_text && (c == 0 || is_control(c)))
            cls = AC_DROP; /* cleaning comes first: \v and \f are Cc, dropped, not whitespace */
        else if (is_space(c))
            cls = AC_SPACE;
        else if (is_punct_ascii(c))
            cls = AC_PUNCT;
        t->ascii_class[c] = cls;
        t->ascii_map[c] = (char)(t->f.opts.do_lower_case && c >= 'A' && c <= 'Z' ? c + 32 : c);
    }
}

/* ---------------------------------------------------------------------------------------------
 * UTF-8 decoding as Python's bytes.decode("utf-8", errors="replace"): each maximal subpart of an
 * ill-formed sequence becomes one U+FFFD (Unicode 15, section 3.9, "U+FFFD Substitution of
 * Maximal Subparts"; table 3-7 gives the well-formed byte ranges used below).
 * ------------------------------------------------------------------------------------------- */

static inline int32_t utf8_next(const unsigned char *s, size_t n, size_t *pos) {
    size_t i = *pos;
    unsigned b0 = s[i];
    int need;
    int32_t cp;
    unsigned lo = 0x80, hi = 0xbf; /* allowed range of the second byte */
    if (b0 >= 0xc2 && b0 <= 0xdf) {
        need = 1;
        cp = b0 & 0x1f;
    } else if (b0 >= 0xe0 && b0 <= 0xef) {
        need = 2;
        cp = b0 & 0x0f;
        if (b0 == 0xe0) lo = 0xa0;         /* no overlong forms */
        if (b0 == 0xed) hi = 0x9f;         /* no surrogates */
    } else if (b0 >= 0xf0 && b0 <= 0xf4) {
        need = 3;
        cp = b0 & 0x07;
        if (b0 == 0xf0) lo = 0x90;         /* no overlong forms */
        if (b0 == 0xf4) hi = 0x8f;         /* nothing above U+10FFFF */
    } else {
        *pos = i + 1; /* a stray continuation byte, C0, C1 or F5..FF */
        return 0xfffd;
    }
    i++;
    for (int k = 0; k < need; k++, i++) {
        if (i >= n || s[i] < lo || s[i] > hi) {
            *pos = i; /* the valid prefix is one maximal subpart; resume at the offending byte */
            return 0xfffd;
        }
        cp = (cp << 6) | (s[i] & 0x3f);
        lo = 0x80;
        hi = 0xbf;
    }
    *pos = i;
    return cp;
}

/* ---------------------------------------------------------------------------------------------
 * Output vectors
 * ------------------------------------------------------------------------------------------- */

void kst_ids_free(kst_ids *v) {
    if (!v) return;
    kst_free(v->ids);
    kst_free(v->type_ids);
    memset(v, 0, sizeof *v);
}

/* Makes room for `more` ids. Both arrays grow before cap changes, so a failure leaves v valid. */
static int ids_reserve(kst_ids *v, size_t more, kst_error *err) {
    if (v->len + more <= v->cap) return KST_OK;
    size_t cap = v->cap ? v->cap : 64;
    while (cap < v->len + more) {
        if (cap > SIZE_MAX / 2) return kst_fail(err, KST_ERR_NOMEM, "token ids: too many tokens");
        cap *= 2;
    }
    void *ids = v->ids, *types = v->type_ids;
    int rc = kst_realloc(&ids, cap, sizeof(int32_t), "token ids", err);
    v->ids = ids;
    if (rc != KST_OK) return rc;
    rc = kst_realloc(&types, cap, sizeof(int32_t), "token type ids", err);
    v->type_ids = types;
    if (rc != KST_OK) return rc;
    v->cap = cap;
    return KST_OK;
}

static inline int ids_push(kst_ids *v, int32_t id, int32_t type, kst_error *err) {
    if (v->len == v->cap) {
        int rc = ids_reserve(v, 1, err);
        if (rc != KST_OK) return rc;
    }
    v->ids[v->len] = id;
    v->type_ids[v->len] = type;
    v->len++;
    return KST_OK;
}

/* ---------------------------------------------------------------------------------------------
 * One tokenization run: the current word and where finished words go
 * ------------------------------------------------------------------------------------------- */

typedef struct run {
    const kst_tokenizer *t;
    kst_ids *ids;        /* WordPiece ids go here, or, when NULL, ... */
    char *words;         /* ... the words themselves, space-separated (kst_tokenizer_pretokenize) */
    size_t words_len, words_cap;
    int32_t type;        /* token type id of what this run appends */
    char *word;          /* the word being built (UTF-8); starts on run_text's stack */
    size_t wlen, wcap;
    int word_on_heap;
    size_t wchars;       /* its length in characters, counted even past the bytes kept */
    size_t keep_chars;   /* characters worth keeping: past max_input_chars_per_word it is [UNK] */
    kst_error *err;
} run;

static int grow_bytes(char **buf, size_t *cap, size_t need, const char *what, kst_error *err) {
    size_t c = *cap ? *cap : 256;
    while (c < need) {
        if (c > SIZE_MAX / 2) return kst_fail(err, KST_ERR_NOMEM, "%s: too long", what);
        c *= 2;
    }
    void *p = *buf;
    int rc = kst_realloc(&p, c, 1, what, err);
    if (rc != KST_OK) return rc;
    *buf = p;
    *cap = c;
    return KST_OK;
}

/* Grows the word buffer to hold `need` bytes, moving it off run_text's stack the first time. */
static int word_grow(run *r, size_t need) {
    if (r->word_on_heap) return grow_bytes(&r->word, &r->wcap, need, "word buffer", r->err);
    char *heap = NULL;
    size_t cap = 0;
    int rc = grow_bytes(&heap, &cap, need > 2 * r->wcap ? need : 2 * r->wcap, "word buffer", r->err);
    if (rc != KST_OK) return rc;
    memcpy(heap, r->word, r->wlen);
    r->word = heap;
    r->wcap = cap;
    r->word_on_heap = 1;
    return KST_OK;
}

static inline int word_put(run *r, const char *bytes, size_t n) {
    if (++r->wchars > r->keep_chars) return KST_OK;
    if (r->wlen + n > r->wcap) {
        int rc = word_grow(r, r->wlen + n);
        if (rc != KST_OK) return rc;
    }
    memcpy(r->word + r->wlen, bytes, n);
    r->wlen += n;
    return KST_OK;
}

static inline int word_put_cp(run *r, int32_t cp) {
    utf8proc_uint8_t b[4];
    utf8proc_ssize_t n = utf8proc_encode_char(cp, b);
    return word_put(r, (const char *)b, (size_t)n);
}

static inline int is_cont(unsigned char b) { return (b & 0xc0) == 0x80; }

/* Greedy longest-match-first WordPiece (BERT's WordpieceTokenizer.tokenize, tokenizers'
 * WordPiece::tokenize): a word longer than max_input_chars_per_word, or one that cannot be covered
 * by vocabulary pieces, becomes a single [UNK]. */
static int wordpiece(run *r) {
    const kst_tokenizer *t = r->t;
    const kst_vocab *v = &t->f.vocab;
    kst_ids *out = r->ids;
    if (r->wchars > t->f.opts.max_input_chars_per_word)
        return ids_push(out, t->ids.unk, r->type, r->err);
    const char *w = r->word;
    size_t n = r->wlen, start = 0, mark = out->len;
    while (start < n) {
        size_t plen = start ? t->prefix_len : 0;
        if (v->max_len <= plen) goto unknown;
        size_t end = n;
        if (end - start > v->max_len - plen) {
            end = start + (v->max_len - plen); /* no longer piece can be in the vocabulary */
            while (end > start && is_cont((unsigned char)w[end])) end--;
        }
        int32_t id = -1;
        while (end > start) {
            id = kst_vocab_find(v, t->f.prefix, plen, w + start, end - start);
            if (id >= 0) break;
            do end--;
            while (end > start && is_cont((unsigned char)w[end]));
        }
        if (id < 0) goto unknown;
        int rc = ids_push(out, id, r->type, r->err);
        if (rc != KST_OK) return rc;
        start = end;
    }
    return KST_OK;
unknown:
    out->len = mark;
    return ids_push(out, t->ids.unk, r->type, r->err);
}

/* Ends the current word (a no-op when it is empty). */
static int flush(run *r) {
    if (r->wchars == 0) return KST_OK;
    int rc;
    if (r->ids) {
        rc = wordpiece(r);
    } else {
        size_t need = r->words_len + r->wlen + 2;
        rc = need > r->words_cap ? grow_bytes(&r->words, &r->words_cap, need, "words", r->err)
                                 : KST_OK;
        if (rc == KST_OK) {
            if (r->words_len) r->words[r->words_len++] = ' ';
            memcpy(r->words + r->words_len, r->word, r->wlen);
            r->words_len += r->wlen;
            r->words[r->words_len] = '\0';
        }
    }
    r->wlen = r->wchars = 0;
    return rc;
}

/* Places one normalised character: whitespace ends the word, punctuation is a word of its own. */
static inline int place(run *r, int32_t cp) {
    int rc;
    if (is_space(cp)) return flush(r);
    if (is_punct(cp)) {
        if ((rc = flush(r)) != KST_OK) return rc;
        if ((rc = word_put_cp(r, cp)) != KST_OK) return rc;
        return flush(r);
    }
    return word_put_cp(r, cp);
}

/* The non-ASCII path, in BertNormalizer's order: clean, isolate CJK, strip accents, lower-case. */
static int put_cp(run *r, int32_t cp) {
    const kst_tokenizer *t = r->t;
    int rc;
    if (is_legacy_plain(cp)) return word_put_cp(r, cp); /* no case, not split, kept by Fast */
    if (cp == 0x111c9) return place(r, cp);             /* punctuation to Fast, never stripped */
    if (t->f.opts.clean_text && (cp == 0xfffd || is_control(cp))) return KST_OK;
    int cjk = t->f.opts.tokenize_chinese_chars && is_cjk(cp);
    if (cjk && (rc = flush(r)) != KST_OK) return rc;
    utf8proc_int32_t buf[32];
    int n = 1;
    buf[0] = cp;
    if (t->strip) {
        /* NFD, then drop nonspacing marks (Mn). */
        int last = 0;
        utf8proc_ssize_t k = utf8proc_decompose_char(cp, buf, 32, UTF8PROC_DECOMPOSE, &last);
        n = (k > 0 && k <= 32) ? (int)k : 1;
        if (n == 1 && k <= 0) buf[0] = cp;
        int m = 0;
        for (int i = 0; i < n; i++)
            if (utf8proc_category(buf[i]) != UTF8PROC_CATEGORY_MN && buf[i] != 0x1734)
                buf[m++] = buf[i]; /* U+1734 was Mn before Unicode 14 made it Mc; Fast drops it */
        n = m;
    }
    for (int i = 0; i < n; i++) {
        int32_t c = buf[i];
        if (t->f.opts.do_lower_case) {
            if (c == 0x130) {
                /* SpecialCasing.txt's one unconditional lower-case expansion: İ -> i + U+0307
                 * (Rust's to_lowercase and Python's lower() agree; utf8proc gives plain "i"). */
                if ((rc = place(r, 'i')) != KST_OK) return rc;
                c = 0x307;
            } else {
                c = utf8proc_tolower(c);
            }
        }
        if ((rc = place(r, c)) != KST_OK) return rc;
    }
    return cjk ? flush(r) : KST_OK;
}

/* Runs the pipeline over one stretch of raw text that holds no added token. */
static int run_segment(run *r, const unsigned char *s, size_t n) {
    const kst_tokenizer *t = r->t;
    int rc = KST_OK;
    size_t i = 0;
    while (i < n) {
        unsigned c = s[i];
        if (c < 0x80) { /* the ASCII fast path: one table lookup per byte */
            i++;
            switch (t->ascii_class[c]) {
            case AC_CHAR:
                if (++r->wchars <= r->keep_chars) {
                    if (r->wlen + 1 > r->wcap) {
                        rc = word_grow(r, r->wlen + 1);
                        if (rc != KST_OK) return rc;
                    }
                    r->word[r->wlen++] = t->ascii_map[c];
                }
                break;
            case AC_SPACE:
                rc = flush(r);
                break;
            case AC_PUNCT:
                if ((rc = flush(r)) == KST_OK && (rc = word_put(r, &t->ascii_map[c], 1)) == KST_OK)
                    rc = flush(r);
                break;
            default: /* AC_DROP */
                break;
            }
        } else {
            rc = put_cp(r, utf8_next(s, n, &i));
        }
        if (rc != KST_OK) return rc;
    }
    return flush(r);
}

/* Finds the first added token at or after s[from]; returns its index or -1, with *at its offset. */
static int next_added(const kst_tokenizer *t, const unsigned char *s, size_t n, size_t from,
                      size_t *at) {
    if (t->n_added == 0) return -1;
    for (size_t i = from; i < n; i++) {
        if (!t->added_first[s[i]]) continue;
        for (size_t k = 0; k < t->n_added; k++) { /* sorted longest first: leftmost-longest */
            const kst_added_token *a = &t->added[k];
            if (a->len <= n - i && memcmp(s + i, a->text, a->len) == 0) {
                *at = i;
                return (int)k;
            }
        }
    }
    return -1;
}

/* Tokenizes text into r: added tokens ([CLS], [SEP], [MASK], ...) written literally in the text
 * are matched first and kept whole, as tokenizers does for its added tokens, then each stretch
 * between them goes through normalisation and WordPiece. */
static int run_text(run *r, const char *text, size_t len) {
    const kst_tokenizer *t = r->t;
    const unsigned char *s = (const unsigned char *)text;
    size_t max = t->f.opts.max_input_chars_per_word;
    char stack_word[512];
    r->word = stack_word;
    r->wcap = sizeof stack_word;
    r->word_on_heap = 0;
    r->wlen = r->wchars = 0;
    r->keep_chars = r->ids ? (max < SIZE_MAX ? max + 1 : max) : SIZE_MAX;
    int rc = KST_OK;
    size_t pos = 0;
    while (pos < len && rc == KST_OK) {
        size_t at = len;
        int k = next_added(t, s, len, pos, &at);
        rc = run_segment(r, s + pos, at - pos);
        if (rc != KST_OK || k < 0) break;
        if (r->ids) {
            rc = ids_push(r->ids, t->added[k].id, r->type, r->err);
        } else {
            /* the literal is a word of its own; run_segment has flushed the one before it */
            if (t->added[k].len > r->wcap)
                rc = word_grow(r, t->added[k].len);
            if (rc == KST_OK) {
                memcpy(r->word, t->added[k].text, t->added[k].len);
                r->wlen = t->added[k].len;
                r->wchars = 1;
                rc = flush(r);
            }
        }
        pos = at + t->added[k].len;
    }
    if (r->word_on_heap) kst_free(r->word);
    r->word = NULL;
    return rc;
}

/* ---------------------------------------------------------------------------------------------
 * Public: tokenizing and encoding
 * ------------------------------------------------------------------------------------------- */

static int tokenize_typed(const kst_tokenizer *t, const char *text, size_t len, int32_t type,
                          kst_ids *out, kst_error *err) {
    run r = {.t = t, .ids = out, .type = type, .err = err};
    size_t mark = out->len;
    int rc = run_text(&r, text, len);
    if (rc != KST_OK) out->len = mark; /* all or nothing */
    return rc;
}

int kst_tokenize(const kst_tokenizer *t, const char *text, size_t len, kst_ids *out,
                 kst_error *err) {
    if (!t || !out || (!text && len))
        return kst_fail(err, KST_ERR_MISUSE, "kst_tokenize: NULL tokenizer, output or text");
    return tokenize_typed(t, text, len, 0, out, err);
}

int kst_tokenizer_pretokenize(const kst_tokenizer *t, const char *text, size_t len, char **out,
                              size_t *out_len, kst_error *err) {
    *out = NULL;
    if (out_len) *out_len = 0;
    if (!t || (!text && len))
        return kst_fail(err, KST_ERR_MISUSE, "kst_tokenizer_pretokenize: NULL tokenizer or text");
    run r = {.t = t, .ids = NULL, .err = err};
    int rc = grow_bytes(&r.words, &r.words_cap, 1, "words", err);
    if (rc != KST_OK) return rc;
    r.words[0] = '\0';
    rc = run_text(&r, text, len);
    if (rc != KST_OK) {
        kst_free(r.words);
        return rc;
    }
    *out = r.words;
    if (out_len) *out_len = r.words_len;
    return KST_OK;
}

/* How many tokens of each segment survive truncation to `budget` (tokenizers'
 * truncate_encodings, TruncationStrategy::LongestFirst). With n1 the shorter: if both fit, keep
 * both; if the shorter fits in half, the longer takes the rest; otherwise each gets half, the longer
 * one the odd token. The slow tokenizer instead removes one token at a time from the longer
 * segment (from the second when equal), which gives the odd token to the first segment when the
 * lengths are equal and can split differently when one segment fits in exactly half; we follow
 * Fast. */
static void longest_first(size_t *na, size_t *nb, size_t budget) {
    if (*na + *nb <= budget) return;
    size_t n1 = *na, n2 = *nb;
    int swap = n1 > n2;
    if (swap) {
        size_t x = n1;
        n1 = n2;
        n2 = x;
    }
    n2 = n1 > budget ? n1 : (n1 > budget - n1 ? n1 : budget - n1);
    if (n1 + n2 > budget) {
        n1 = budget / 2;
        n2 = n1 + budget % 2;
    }
    *na = swap ? n2 : n1;
    *nb = swap ? n1 : n2;
}

int kst_tokenizer_encode(const kst_tokenizer *t, const char *a, size_t alen, const char *b,
                         size_t blen, size_t max_len, kst_ids *out, kst_error *err) {
    if (!t || !out || (!a && alen))
        return kst_fail(err, KST_ERR_MISUSE, "kst_tokenizer_encode: NULL tokenizer, output or text");
    out->len = 0;
    if (b && blen == 0) b = NULL; /* transformers treats an empty text_pair as no pair at all */
    int32_t cls = t->ids.cls, sep = t->ids.sep;
    if (cls < 0 || sep < 0)
        return kst_fail(err, KST_ERR_FORMAT,
                        "tokenizer: the vocabulary lacks the %s token \"%s\"; cannot build model "
                        "input",
                        cls < 0 ? "classifier" : "separator",
                        cls < 0 ? t->special[KST_SP_CLS] : t->special[KST_SP_SEP]);
    size_t specials = b ? 3 : 2;
    if (max_len > 0 && max_len < specials)
        return kst_fail(err, KST_ERR_INVALID,
                        "kst_tokenizer_encode: max_len %zu cannot hold the %zu special tokens",
                        max_len, specials);
    int rc;
    KST_TRY(ids_push(out, cls, 0, err));
    KST_TRY(tokenize_typed(t, a ? a : "", alen, 0, out, err));
    size_t na = out->len - 1, nb = 0;
    if (b) {
        KST_TRY(tokenize_typed(t, b, blen, 1, out, err));
        nb = out->len - 1 - na;
    }
    KST_TRY(ids_reserve(out, 2, err));
    size_t ka = na, kb = nb;
    if (max_len > 0) {
        size_t budget = max_len - specials;
        if (b)
            longest_first(&ka, &kb, budget);
        else if (ka > budget)
            ka = budget;
    }
    /* [CLS] a[0..ka) [SEP] b[0..kb) [SEP]: b's kept tokens move to just after the first [SEP]. */
    if (b) memmove(out->ids + 2 + ka, out->ids + 1 + na, kb * sizeof *out->ids);
    out->ids[1 + ka] = sep;
    out->type_ids[1 + ka] = 0;
    out->len = 2 + ka;
    if (b) {
        for (size_t i = 0; i < kb; i++) out->type_ids[out->len + i] = 1;
        out->len += kb;
        out->ids[out->len] = sep;
        out->type_ids[out->len] = 1;
        out->len++;
    }
    return KST_OK;
done:
    out->len = 0;
    return rc;
}

/* ---------------------------------------------------------------------------------------------
 * Public: lookups
 * ------------------------------------------------------------------------------------------- */

int32_t kst_token_id(const kst_tokenizer *t, const char *token) {
    if (!t || !token) return -1;
    return kst_vocab_find(&t->f.vocab, NULL, 0, token, strlen(token));
}

const char *kst_token_str(const kst_tokenizer *t, int32_t id) {
    if (!t || id < 0 || (size_t)id >= t->f.vocab.n) return NULL;
    return t->f.vocab.text + t->f.vocab.offset[id];
}

size_t kst_tokenizer_vocab_size(const kst_tokenizer *t) { return t ? t->f.vocab.n : 0; }

kst_special_ids kst_tokenizer_special(const kst_tokenizer *t) {
    kst_special_ids none = {-1, -1, -1, -1, -1};
    return t ? t->ids : none;
}

size_t kst_tokenizer_model_max_length(const kst_tokenizer *t) {
    return t ? t->f.model_max_length : 0;
}

kst_tokenizer_opts kst_tokenizer_get_opts(const kst_tokenizer *t) {
    return t ? t->f.opts : kst_tokenizer_opts_default();
}

/* ---------------------------------------------------------------------------------------------
 * Public: loading
 * ------------------------------------------------------------------------------------------- */

void kst_tokenizer_free(kst_tokenizer *t) {
    if (!t) return;
    kst_tokenizer_files_free(&t->f);
    kst_free(t->added);
    kst_free(t);
}

/* Resolves options and special ids and builds the lookup tables; `where` names the vocabulary
 * file in messages. */
static int finish(kst_tokenizer *t, const char *where, kst_error *err) {
    const kst_tokenizer_opts *o = &t->f.opts;
    t->strip = o->strip_accents < 0 ? o->do_lower_case != 0 : o->strip_accents != 0;
    t->prefix_len = strlen(t->f.prefix);
    int32_t *id[KST_SP_COUNT] = {&t->ids.cls, &t->ids.sep, &t->ids.pad, &t->ids.unk, &t->ids.mask};
    for (int i = 0; i < KST_SP_COUNT; i++) {
        t->special[i] = t->f.special[i] ? t->f.special[i] : SPECIAL_DEFAULT[i];
        *id[i] = kst_vocab_find(&t->f.vocab, NULL, 0, t->special[i], strlen(t->special[i]));
    }
    if (t->ids.unk < 0)
        return kst_fail(err, KST_ERR_FORMAT,
                        "%s: the unknown token \"%.64s\" is not in the vocabulary; WordPiece needs "
                        "it for words it cannot split",
                        where, t->special[KST_SP_UNK]);

    /* Added tokens: tokenizer.json's list when it has one, else the special tokens the vocabulary
     * holds (what transformers registers for a vocab.txt checkpoint). Their text is borrowed. */
    size_t n = t->f.n_added;
    if (n == 0)
        for (int i = 0; i < KST_SP_COUNT; i++) n += *id[i] >= 0;
    if (n > 0) {
        t->added = kst_malloc(n, sizeof *t->added, "added tokens", err);
        if (!t->added) return KST_ERR_NOMEM;
    }
    if (t->f.n_added) {
        memcpy(t->added, t->f.added, n * sizeof *t->added);
    } else {
        size_t k = 0;
        for (int i = 0; i < KST_SP_COUNT; i++)
            if (*id[i] >= 0)
                t->added[k++] = (kst_added_token){(char *)t->special[i], strlen(t->special[i]),
                                                  *id[i]};
    }
    t->n_added = n;
    for (size_t i = 1; i < n; i++) { /* longest first, so the leftmost match is also the longest */
        kst_added_token x = t->added[i];
        size_t j = i;
        for (; j > 0 && t->added[j - 1].len < x.len; j--) t->added[j] = t->added[j - 1];
        t->added[j] = x;
    }
    for (size_t i = 0; i < n; i++) t->added_first[(unsigned char)t->added[i].text[0]] = 1;
    build_ascii_tables(t);
    return KST_OK;
}

int kst_tokenizer_load(const char *dir, kst_tokenizer **out, kst_error *err) {
    *out = NULL;
    if (!dir) return kst_fail(err, KST_ERR_MISUSE, "kst_tokenizer_load: NULL folder");
    kst_tokenizer *t = kst_calloc(1, sizeof *t, "tokenizer", err);
    if (!t) return KST_ERR_NOMEM;
    int rc;
    KST_TRY(kst_tokenizer_files_read(dir, &t->f, err));
    KST_TRY(finish(t, dir, err));
    *out = t;
    return KST_OK;
done:
    kst_tokenizer_free(t);
    return rc;
}

int kst_tokenizer_from_vocab(const char *vocab_path, const kst_tokenizer_opts *opts,
                             kst_tokenizer **out, kst_error *err) {
    *out = NULL;
    if (!vocab_path) return kst_fail(err, KST_ERR_MISUSE, "kst_tokenizer_from_vocab: NULL path");
    kst_tokenizer *t = kst_calloc(1, sizeof *t, "tokenizer", err);
    if (!t) return KST_ERR_NOMEM;
    int rc;
    t->f.opts = opts ? *opts : kst_tokenizer_opts_default();
    strcpy(t->f.prefix, "##");
    KST_TRY(kst_vocab_read_txt(&t->f.vocab, vocab_path, err));
    KST_TRY(finish(t, vocab_path, err));
    *out = t;
    return KST_OK;
done:
    kst_tokenizer_free(t);
    return rc;
}
