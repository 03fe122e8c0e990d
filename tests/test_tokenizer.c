/* test_tokenizer.c - WordPiece tokenizer against Hugging Face: the 9,900-query oracle, the fixtures
 * written by tests/fixtures/fx_tokenizer.py, bad input and allocation-failure injection. */
#include "harness.h"

#include <errno.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include "core/mem.h"
#include "encoders/tokenizer.h"

#define FIXTURES "tests/fixtures/tokenizer"

/* ---------------------------------------------------------------------------------------------
 * Helpers
 * ------------------------------------------------------------------------------------------- */

static const char *vocab_path(void) { return shared_path("bert-base-uncased/vocab.txt"); }

static kst_tokenizer *load_vocab(const kst_tokenizer_opts *o) {
    kst_error err = {0};
    kst_tokenizer *t = NULL;
    char path[4096];
    snprintf(path, sizeof path, "%s", vocab_path());
    if (access(path, R_OK) != 0) return NULL;
    assert_ok(kst_tokenizer_from_vocab(path, o, &t, &err), &err);
    return t;
}

static int hexval(int c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* Decodes n hex digits into out (n/2 bytes); returns the byte count. */
static size_t unhex(const char *h, size_t n, char *out) {
    size_t k = 0;
    for (size_t i = 0; i + 1 < n; i += 2) out[k++] = (char)(hexval(h[i]) * 16 + hexval(h[i + 1]));
    return k;
}

/* Splits line at tabs in place; returns the field count (at most max). */
static int split_tabs(char *line, char **f, int max) {
    int n = 0;
    f[n++] = line;
    for (char *p = line; *p && n < max; p++)
        if (*p == '\t') {
            *p = '\0';
            f[n++] = p + 1;
        }
    return n;
}

static void chomp(char *s) {
    size_t n = strlen(s);
    while (n && (s[n - 1] == '\n' || s[n - 1] == '\r')) s[--n] = '\0';
}

static char tmpdir[256];

static const char *tmp_path(const char *name) {
    static char buf[1024]; /* tmpdir (< 256) + "/" + name */
    snprintf(buf, sizeof buf, "%s/%s", tmpdir, name);
    return buf;
}

static void write_file(const char *path, const char *data, size_t n) {
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(data, 1, n, f), n);
    fclose(f);
}

/* ---------------------------------------------------------------------------------------------
 * 1. The oracle: 9,900 real queries tokenized by bert-base-uncased (anserini-tools)
 * ------------------------------------------------------------------------------------------- */

typedef struct query {
    char *qid, *text;
} query;

static int cmp_query(const void *a, const void *b) {
    return strcmp(((const query *)a)->qid, ((const query *)b)->qid);
}

/* Reads `qid<TAB>text` lines of a plain or gzipped file (gzopen reads both). */
static size_t read_topics(const char *path, query **qs, size_t *cap, size_t n) {
    gzFile g = gzopen(path, "rb");
    if (!g) fail_msg("cannot open %s", path);
    static char line[1 << 20];
    while (gzgets(g, line, sizeof line)) {
        chomp(line);
        char *tab = strchr(line, '\t');
        if (!tab) continue;
        *tab = '\0';
        if (n == *cap) {
            *cap = *cap ? *cap * 2 : 1024;
            *qs = realloc(*qs, *cap * sizeof **qs);
        }
        (*qs)[n].qid = strdup(line);
        (*qs)[n].text = strdup(tab + 1);
        n++;
    }
    gzclose(g);
    return n;
}

static void test_oracle_anserini(void **state) {
    (void)state;
    static const char *const sets[][2] = {
        {"topics.msmarco-passage.dev-subset.txt", "topics.msmarco-passage.dev-subset.wp.tsv.gz"},
        {"topics.dl19-passage.txt", "topics.dl19-passage.wp.tsv.gz"},
        {"topics.dl20.txt", "topics.dl20.wp.tsv.gz"},
        {"topics.beir-v1.0.0-scifact.test.tsv.gz", "topics.beir-v1.0.0-scifact.test.wp.tsv.gz"},
        {"topics.beir-v1.0.0-nfcorpus.test.tsv.gz", "topics.beir-v1.0.0-nfcorpus.test.wp.tsv.gz"},
        {"topics.beir-v1.0.0-fiqa.test.tsv.gz", "topics.beir-v1.0.0-fiqa.test.wp.tsv.gz"},
        {"topics.beir-v1.0.0-arguana.test.tsv.gz", "topics.beir-v1.0.0-arguana.test.wp.tsv.gz"},
    };
    kst_tokenizer *t = load_vocab(NULL);
    if (!t) skip_because("no %s", vocab_path());
    size_t total = 0, matched = 0;
    kst_ids ids = {0};
    kst_error err = {0};
    char path[4096];
    for (size_t s = 0; s < sizeof sets / sizeof sets[0]; s++) {
        query *raw = NULL, *wp = NULL;
        size_t rcap = 0, wcap = 0;
        snprintf(path, sizeof path, "%s/anserini-topics-qrels/topics/%s", shared_dir(), sets[s][0]);
        size_t nr = read_topics(path, &raw, &rcap, 0);
        snprintf(path, sizeof path, "%s/anserini-topics-qrels/topics/%s", shared_dir(), sets[s][1]);
        size_t nw = read_topics(path, &wp, &wcap, 0);
        qsort(raw, nr, sizeof *raw, cmp_query);
        size_t set_matched = 0;
        /* Join on qid: the .wp files may list queries in another order. */
        for (size_t i = 0; i < nw; i++) {
            query *q = bsearch(&wp[i], raw, nr, sizeof *raw, cmp_query);
            total++;
            if (!q) {
                fprintf(stderr, "%s: qid %s has no raw text\n", sets[s][1], wp[i].qid);
                continue;
            }
            ids.len = 0;
            assert_ok(kst_tokenize(t, q->text, strlen(q->text), &ids, &err), &err);
            /* Compare token strings (the oracle has no ids), without truncation. */
            int ok = 1;
            const char *p = wp[i].text;
            for (size_t k = 0; k < ids.len && ok; k++) {
                const char *tok = kst_token_str(t, ids.ids[k]);
                size_t n = strlen(tok);
                if (strncmp(p, tok, n) != 0 || (p[n] != ' ' && p[n] != '\0')) ok = 0;
                p += n + (p[n] == ' ');
            }
            if (ok && *p) ok = 0;
            if (ok) {
                set_matched++;
            } else if (total - matched - set_matched < 5) {
                fprintf(stderr, "mismatch qid %s\n  text: %s\n  want: %s\n  got :", q->qid, q->text,
                        wp[i].text);
                for (size_t k = 0; k < ids.len; k++)
                    fprintf(stderr, " %s", kst_token_str(t, ids.ids[k]));
                fprintf(stderr, "\n");
            }
        }
        matched += set_matched;
        fprintf(stderr, "[          ] %-48s %zu/%zu\n", sets[s][1], set_matched, nw);
        for (size_t i = 0; i < nr; i++) free(raw[i].qid), free(raw[i].text);
        for (size_t i = 0; i < nw; i++) free(wp[i].qid), free(wp[i].text);
        free(raw);
        free(wp);
    }
    fprintf(stderr, "[          ] oracle: %zu of %zu queries match token for token\n", matched,
            total);
    assert_int_equal(total, 9900);
    assert_int_equal(matched, total);
    kst_ids_free(&ids);
    kst_tokenizer_free(t);
}

/* ---------------------------------------------------------------------------------------------
 * 2. Fixtures from transformers (fx_tokenizer.py)
 * ------------------------------------------------------------------------------------------- */

static void parse_ints(const char *s, int32_t **out, size_t *n) {
    *n = 0;
    *out = NULL;
    size_t cap = 0;
    while (*s) {
        char *end;
        long v = strtol(s, &end, 10);
        if (end == s) break;
        if (*n == cap) {
            cap = cap ? cap * 2 : 64;
            *out = realloc(*out, cap * sizeof **out);
        }
        (*out)[(*n)++] = (int32_t)v;
        s = *end == ',' ? end + 1 : end;
    }
}

static void test_fixture_cases(void **state) {
    (void)state;
    kst_error err = {0};
    kst_tokenizer *uncased = load_vocab(NULL);
    if (!uncased) skip_because("no %s", vocab_path());
    kst_tokenizer_opts o = kst_tokenizer_opts_default();
    o.do_lower_case = 0;
    kst_tokenizer *cased = load_vocab(&o);
    kst_tokenizer *json = NULL;
    assert_ok(kst_tokenizer_load(FIXTURES "/json_only", &json, &err), &err);
    /* tokenizer_config.json's settings came through, and 1e30 reads as "no limit". */
    kst_tokenizer_opts jo = kst_tokenizer_get_opts(json);
    assert_int_equal(jo.do_lower_case, 1);
    assert_int_equal(jo.strip_accents, 0);
    assert_int_equal(kst_tokenizer_model_max_length(json), 0);
    assert_int_equal(kst_tokenizer_vocab_size(json), 30522);
    kst_special_ids sp = kst_tokenizer_special(json);
    assert_int_equal(sp.cls, 101);
    assert_int_equal(sp.sep, 102);
    assert_int_equal(sp.pad, 0);
    assert_int_equal(sp.unk, 100);
    assert_int_equal(sp.mask, 103);

    FILE *f = fopen(FIXTURES "/cases.tsv", "r");
    if (!f) fail_msg("cannot open " FIXTURES "/cases.tsv (run tests/fixtures/fx_tokenizer.py)");
    static char line[1 << 16];
    assert_non_null(fgets(line, sizeof line, f));
    chomp(line);
    assert_string_equal(line, "KST-TOKENIZER-CASES 1");
    size_t n = 0, bad = 0;
    kst_ids out = {0};
    char *a = malloc(sizeof line), *b = malloc(sizeof line);
    while (fgets(line, sizeof line, f)) {
        chomp(line);
        char *fl[6];
        if (split_tabs(line, fl, 6) != 6) fail_msg("cases.tsv: bad line %zu", n + 2);
        const kst_tokenizer *t = !strcmp(fl[0], "uncased") ? uncased
                                 : !strcmp(fl[0], "cased") ? cased
                                                           : json;
        size_t max_len = (size_t)atol(fl[1]);
        size_t alen = unhex(fl[2], strlen(fl[2]), a);
        int pair = strcmp(fl[3], "-") != 0;
        size_t blen = pair ? unhex(fl[3], strlen(fl[3]), b) : 0;
        int32_t *want, *want_types;
        size_t nw, nt;
        parse_ints(fl[4], &want, &nw);
        parse_ints(fl[5], &want_types, &nt);
        assert_ok(kst_tokenizer_encode(t, a, alen, pair ? b : NULL, blen, max_len, &out, &err),
                  &err);
        int same = out.len == nw && nt == nw;
        for (size_t i = 0; same && i < nw; i++)
            same = out.ids[i] == want[i] && out.type_ids[i] == want_types[i];
        if (!same && bad++ < 10) {
            fprintf(stderr, "%s max_len %zu a=\"%.*s\"%s%.*s%s\n  want:", fl[0], max_len,
                    (int)alen, a, pair ? " b=\"" : "", (int)blen, b, pair ? "\"" : "");
            for (size_t i = 0; i < nw; i++) fprintf(stderr, " %d/%d", want[i], want_types[i]);
            fprintf(stderr, "\n  got :");
            for (size_t i = 0; i < out.len; i++)
                fprintf(stderr, " %d/%d", out.ids[i], out.type_ids[i]);
            fprintf(stderr, "\n");
        }
        free(want);
        free(want_types);
        n++;
    }
    fclose(f);
    free(a);
    free(b);
    fprintf(stderr, "[          ] fixture cases: %zu of %zu match\n", n - bad, n);
    assert_true(n > 400);
    assert_int_equal(bad, 0);
    kst_ids_free(&out);
    kst_tokenizer_free(uncased);
    kst_tokenizer_free(cased);
    kst_tokenizer_free(json);
}

static void test_fixture_codepoints(void **state) {
    (void)state;
    kst_error err = {0};
    kst_tokenizer_opts o[3] = {kst_tokenizer_opts_default(), kst_tokenizer_opts_default(),
                               kst_tokenizer_opts_default()};
    o[1].do_lower_case = 0;
    o[1].strip_accents = 0;
    o[2].strip_accents = 0;
    kst_tokenizer *t[3];
    for (int k = 0; k < 3; k++) {
        t[k] = load_vocab(&o[k]);
        if (!t[k]) skip_because("no %s", vocab_path());
    }
    FILE *f = fopen(FIXTURES "/codepoints.tsv", "r");
    if (!f) fail_msg("cannot open " FIXTURES "/codepoints.tsv (run tests/fixtures/fx_tokenizer.py)");
    char line[4096], want[2048];
    assert_non_null(fgets(line, sizeof line, f));
    chomp(line);
    assert_string_equal(line, "KST-TOKENIZER-CODEPOINTS 1");
    size_t n = 0, bad = 0;
    while (fgets(line, sizeof line, f)) {
        chomp(line);
        char *fl[4];
        if (split_tabs(line, fl, 4) != 4) fail_msg("codepoints.tsv: bad line %zu", n + 2);
        long cp = strtol(fl[0], NULL, 16);
        char text[8];
        size_t tl = 0;
        text[tl++] = 'a';
        /* UTF-8 encode cp (never a surrogate here). */
        if (cp < 0x80) {
            text[tl++] = (char)cp;
        } else if (cp < 0x800) {
            text[tl++] = (char)(0xc0 | (cp >> 6));
            text[tl++] = (char)(0x80 | (cp & 0x3f));
        } else if (cp < 0x10000) {
            text[tl++] = (char)(0xe0 | (cp >> 12));
            text[tl++] = (char)(0x80 | ((cp >> 6) & 0x3f));
            text[tl++] = (char)(0x80 | (cp & 0x3f));
        } else {
            text[tl++] = (char)(0xf0 | (cp >> 18));
            text[tl++] = (char)(0x80 | ((cp >> 12) & 0x3f));
            text[tl++] = (char)(0x80 | ((cp >> 6) & 0x3f));
            text[tl++] = (char)(0x80 | (cp & 0x3f));
        }
        text[tl++] = 'b';
        for (int k = 0; k < 3; k++) {
            size_t wl;
            if (!strcmp(fl[k + 1], "=")) {
                memcpy(want, text, tl);
                wl = tl;
            } else { /* hex words separated by spaces */
                wl = 0;
                for (const char *p = fl[k + 1]; *p;) {
                    if (*p == ' ') {
                        want[wl++] = ' ';
                        p++;
                        continue;
                    }
                    want[wl++] = (char)(hexval(p[0]) * 16 + hexval(p[1]));
                    p += 2;
                }
            }
            char *got;
            size_t gl;
            assert_ok(kst_tokenizer_pretokenize(t[k], text, tl, &got, &gl, &err), &err);
            if ((gl != wl || memcmp(got, want, wl) != 0) && bad++ < 10)
                fprintf(stderr, "U+%04lX config %d: want \"%.*s\" got \"%s\"\n", cp, k, (int)wl,
                        want, got);
            kst_free(got);
        }
        n++;
    }
    fclose(f);
    fprintf(stderr, "[          ] code points: %zu sampled x 3 configs, %zu differ\n", n, bad);
    assert_true(n > 3000);
    assert_int_equal(bad, 0);
    for (int k = 0; k < 3; k++) kst_tokenizer_free(t[k]);
}

/* ---------------------------------------------------------------------------------------------
 * 3. Direct checks: encode layout, lookups, vocab.txt line endings
 * ------------------------------------------------------------------------------------------- */

static void test_vocab_line_endings(void **state) {
    (void)state;
    kst_error err = {0};
    kst_tokenizer *t = NULL;
    static const char crlf[] = "[PAD]\r\n[UNK]\r\n[CLS]\r\n[SEP]\r\nhello\r\n##s\r\nworld";
    write_file(tmp_path("crlf.txt"), crlf, sizeof crlf - 1);
    assert_ok(kst_tokenizer_from_vocab(tmp_path("crlf.txt"), NULL, &t, &err), &err);
    assert_int_equal(kst_tokenizer_vocab_size(t), 7);
    assert_int_equal(kst_token_id(t, "world"), 6); /* the last line has no newline */
    assert_int_equal(kst_token_id(t, "hello"), 4);
    assert_null(kst_token_str(t, 7));
    assert_null(kst_token_str(t, -1));
    assert_string_equal(kst_token_str(t, 5), "##s");
    kst_special_ids sp = kst_tokenizer_special(t);
    assert_int_equal(sp.mask, -1); /* not in this vocabulary */
    assert_int_equal(sp.unk, 1);
    kst_ids v = {0};
    assert_ok(kst_tokenizer_encode(t, "Hellos  WORLD!", 14, NULL, 0, 0, &v, &err), &err);
    int32_t want[] = {2, 4, 5, 6, 1, 3};
    assert_int_equal(v.len, 6);
    assert_memory_equal(v.ids, want, sizeof want);
    /* max_len too small for the special tokens is an error, not a crash */
    assert_int_equal(kst_tokenizer_encode(t, "a", 1, "b", 1, 2, &v, &err), KST_ERR_INVALID);
    assert_int_equal(kst_tokenizer_encode(t, "a", 1, NULL, 0, 1, &v, &err), KST_ERR_INVALID);
    kst_ids_free(&v);
    kst_ids_free(&v); /* freeing twice (zeroed) is harmless */
    kst_tokenizer_free(t);
    kst_tokenizer_free(NULL);
}

/* ---------------------------------------------------------------------------------------------
 * 4. Bad input
 * ------------------------------------------------------------------------------------------- */

static void expect_vocab_error(const char *name, const char *data, size_t n, int code,
                               const char *needle) {
    kst_error err = {0};
    kst_tokenizer *t = (kst_tokenizer *)1;
    write_file(tmp_path(name), data, n);
    int rc = kst_tokenizer_from_vocab(tmp_path(name), NULL, &t, &err);
    if (rc != code) fail_msg("%s: got %s (%s)", name, kst_status_name(rc), err.msg);
    assert_null(t);
    assert_msg_has(err.msg, name);
    assert_msg_has(err.msg, needle);
}

static void test_bad_vocab(void **state) {
    (void)state;
    kst_error err = {0};
    kst_tokenizer *t = NULL;
    int rc = kst_tokenizer_from_vocab(tmp_path("missing.txt"), NULL, &t, &err);
    assert_int_equal(rc, KST_ERR_IO);
    assert_msg_has(err.msg, "missing.txt");
    expect_vocab_error("empty.txt", "", 0, KST_ERR_FORMAT, "empty");
    expect_vocab_error("dup.txt", "[UNK]\na\nb\na\n", 12, KST_ERR_FORMAT, "line 4: duplicate");
    expect_vocab_error("blank.txt", "[UNK]\na\n\nb\n", 11, KST_ERR_FORMAT, "line 3: empty line");
    expect_vocab_error("utf8.txt", "[UNK]\na\xff\n", 9, KST_ERR_FORMAT, "line 2: invalid UTF-8");
    expect_vocab_error("nounk.txt", "a\nb\n", 4, KST_ERR_FORMAT, "\"[UNK]\" is not in the vocab");
}

static void write_dir_file(const char *dir, const char *name, const char *text) {
    char p[1024]; /* dir (< 512) + "/" + name */
    snprintf(p, sizeof p, "%s/%s", dir, name);
    write_file(p, text, strlen(text));
}

static void test_bad_folders(void **state) {
    (void)state;
    kst_error err = {0};
    kst_tokenizer *t = NULL;
    char dir[512];

    /* neither vocab.txt nor tokenizer.json */
    snprintf(dir, sizeof dir, "%s/empty_dir", tmpdir);
    mkdir(dir, 0755);
    assert_int_equal(kst_tokenizer_load(dir, &t, &err), KST_ERR_NOTFOUND);
    assert_null(t);
    assert_msg_has(err.msg, "empty_dir");
    assert_msg_has(err.msg, "vocab.txt");
    assert_msg_has(err.msg, "tokenizer.json");

    /* corrupt tokenizer.json: file, line and column */
    snprintf(dir, sizeof dir, "%s/corrupt", tmpdir);
    mkdir(dir, 0755);
    write_dir_file(dir, "tokenizer.json", "{\n  \"model\": {\n    \"type\": \"WordPiece\",,\n");
    assert_int_equal(kst_tokenizer_load(dir, &t, &err), KST_ERR_FORMAT);
    assert_msg_has(err.msg, "corrupt/tokenizer.json");
    assert_msg_has(err.msg, "line 3");
    assert_msg_has(err.msg, "column");

    /* a BPE model */
    snprintf(dir, sizeof dir, "%s/bpe", tmpdir);
    mkdir(dir, 0755);
    write_dir_file(dir, "tokenizer.json",
                   "{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": []}}");
    assert_int_equal(kst_tokenizer_load(dir, &t, &err), KST_ERR_UNSUPPORTED);
    assert_msg_has(err.msg, "\"BPE\"");
    assert_msg_has(err.msg, "WordPiece");

    /* WordPiece with ids that are not 0..n-1 */
    snprintf(dir, sizeof dir, "%s/gap", tmpdir);
    mkdir(dir, 0755);
    write_dir_file(dir, "tokenizer.json",
                   "{\"model\": {\"type\": \"WordPiece\", \"vocab\": {\"[UNK]\": 0, \"a\": 5}}}");
    assert_int_equal(kst_tokenizer_load(dir, &t, &err), KST_ERR_FORMAT);
    assert_msg_has(err.msg, "\"a\" has id 5");

    /* a small valid tokenizer.json-only folder with a cased normalizer and no config */
    snprintf(dir, sizeof dir, "%s/small", tmpdir);
    mkdir(dir, 0755);
    write_dir_file(dir, "tokenizer.json",
                   "{\"added_tokens\": [{\"id\": 1, \"content\": \"<unk>\"}],"
                   " \"normalizer\": {\"type\": \"BertNormalizer\", \"lowercase\": false,"
                   " \"strip_accents\": null, \"clean_text\": true, \"handle_chinese_chars\": true},"
                   " \"model\": {\"type\": \"WordPiece\", \"unk_token\": \"<unk>\","
                   " \"continuing_subword_prefix\": \"@@\", \"max_input_chars_per_word\": 5,"
                   " \"vocab\": {\"A\": 0, \"<unk>\": 1, \"@@b\": 2, \"a\": 3}}}");
    assert_ok(kst_tokenizer_load(dir, &t, &err), &err);
    kst_ids v = {0};
    assert_ok(kst_tokenize(t, "Ab ab aaaaaa a<unk>", 19, &v, &err), &err);
    int32_t want[] = {0, 2, 3, 2, 1, 3, 1};
    assert_int_equal(v.len, 7);
    assert_memory_equal(v.ids, want, sizeof want);
    kst_ids_free(&v);
    kst_tokenizer_free(t);

    /* tokenizer_config.json of the wrong shape */
    snprintf(dir, sizeof dir, "%s/badcfg", tmpdir);
    mkdir(dir, 0755);
    write_dir_file(dir, "vocab.txt", "[UNK]\na\n");
    write_dir_file(dir, "tokenizer_config.json", "{\"do_lower_case\": \"yes\"}");
    assert_int_equal(kst_tokenizer_load(dir, &t, &err), KST_ERR_FORMAT);
    assert_msg_has(err.msg, "tokenizer_config.json");
    assert_msg_has(err.msg, "do_lower_case");
    write_dir_file(dir, "tokenizer_config.json",
                   "{\"do_lower_case\": false, \"unk_token\": {\"content\": \"a\"},"
                   " \"model_max_length\": 512}");
    assert_ok(kst_tokenizer_load(dir, &t, &err), &err);
    assert_int_equal(kst_tokenizer_special(t).unk, 1);
    assert_int_equal(kst_tokenizer_model_max_length(t), 512);
    assert_int_equal(kst_tokenizer_get_opts(t).do_lower_case, 0);
    kst_tokenizer_free(t);
}

static void test_huge_text(void **state) {
    (void)state;
    kst_tokenizer *t = load_vocab(NULL);
    if (!t) skip_because("no %s", vocab_path());
    /* 10 MB: words, punctuation, accents, CJK, invalid bytes and one 1 MB word with no spaces. */
    size_t n = 10u << 20;
    char *s = malloc(n);
    static const char piece[] = "Tokenize, this: naïve 中文 text\xff\xc3 again! ";
    size_t k = 0;
    while (k + sizeof piece < n - (1u << 20)) {
        memcpy(s + k, piece, sizeof piece - 1);
        k += sizeof piece - 1;
    }
    memset(s + k, 'x', n - k);
    kst_ids v = {0};
    kst_error err = {0};
    assert_ok(kst_tokenize(t, s, n, &v, &err), &err);
    assert_true(v.len > 1000000);
    assert_int_equal(v.ids[v.len - 1], kst_tokenizer_special(t).unk); /* the giant word */
    assert_ok(kst_tokenizer_encode(t, s, n, s, n, 512, &v, &err), &err);
    assert_int_equal(v.len, 512);
    kst_ids_free(&v);
    free(s);
    kst_tokenizer_free(t);
}

/* ---------------------------------------------------------------------------------------------
 * 5. Allocation failure: the Nth allocation fails for N = 1, 2, ... until the call succeeds
 * ------------------------------------------------------------------------------------------- */

static void test_alloc_failure_load(void **state) {
    (void)state;
    const char *dirs[] = {FIXTURES "/json_only", NULL};
    char vdir[512];
    snprintf(vdir, sizeof vdir, "%s/bert-base-uncased", shared_dir());
    dirs[1] = vdir;
    for (int d = 0; d < 2; d++) {
        int ok = 0;
        long nth;
        /* Every early allocation, then a geometric stride: parsing tokenizer.json makes tens of
         * thousands (cJSON allocates through kst_malloc). */
        for (nth = 1; nth < 10000000 && !ok; nth = nth < 300 ? nth + 1 : nth + nth / 7) {
            kst_error err = {0};
            kst_tokenizer *t = NULL;
            kst_mem_fail_after(nth);
            int rc = kst_tokenizer_load(dirs[d], &t, &err);
            kst_mem_fail_after(0);
            if (rc == KST_OK) {
                ok = 1;
                kst_tokenizer_free(t);
            } else {
                if (rc != KST_ERR_NOMEM) fail_msg("%s, alloc %ld: %s", dirs[d], nth, err.msg);
                assert_null(t);
            }
        }
        assert_true(ok);
        fprintf(stderr, "[          ] load %s: succeeded once allocation %ld could succeed\n",
                dirs[d], nth - 1);
    }
}

static void test_alloc_failure_encode(void **state) {
    (void)state;
    kst_tokenizer *t = load_vocab(NULL);
    if (!t) skip_because("no %s", vocab_path());
    char text[20000];
    for (size_t i = 0; i < sizeof text; i++) text[i] = "ab c\xc3\xa9 d, "[i % 10];
    memset(text + 100, 'z', 600); /* a long word to push the word buffer off the stack */
    int ok = 0;
    for (long nth = 1; nth < 100 && !ok; nth++) {
        kst_ids v = {0};
        kst_error err = {0};
        kst_mem_fail_after(nth);
        int rc = kst_tokenizer_encode(t, text, sizeof text, text, 700, 0, &v, &err);
        char *w = NULL;
        int rc2 = rc == KST_OK ? kst_tokenizer_pretokenize(t, text, sizeof text, &w, NULL, &err)
                               : rc;
        kst_mem_fail_after(0);
        if (rc == KST_OK && rc2 == KST_OK) ok = 1;
        else assert_int_equal(rc == KST_OK ? rc2 : rc, KST_ERR_NOMEM);
        if (rc != KST_OK) assert_int_equal(v.len, 0);
        kst_free(w);
        kst_ids_free(&v);
    }
    assert_true(ok);
    kst_tokenizer_free(t);
}

/* ---------------------------------------------------------------------------------------------
 * Runner
 * ------------------------------------------------------------------------------------------- */

static int setup(void **state) {
    (void)state;
    snprintf(tmpdir, sizeof tmpdir, "/tmp/kst_test_tokenizer.XXXXXX");
    return mkdtemp(tmpdir) ? 0 : -1;
}

static int teardown(void **state) {
    (void)state;
    char cmd[512];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
    return system(cmd) == 0 ? 0 : -1;
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_oracle_anserini),
        cmocka_unit_test(test_fixture_cases),
        cmocka_unit_test(test_fixture_codepoints),
        cmocka_unit_test(test_vocab_line_endings),
        cmocka_unit_test(test_bad_vocab),
        cmocka_unit_test(test_bad_folders),
        cmocka_unit_test(test_huge_text),
        cmocka_unit_test(test_alloc_failure_load),
        cmocka_unit_test(test_alloc_failure_encode),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
