/* test_checkpoint_write.c - the safetensors writer and kst_checkpoint_save on every fixture layout.
 *
 * Each fixture checkpoint (tests/fixtures/models) is opened, saved to a temporary folder and
 * reopened. The saved one must give the reference libraries' outputs (kestrel_ref/, same
 * tolerances as test_encoders.c: embeddings 1e-4 absolute, scores 1e-4 relative with a 1e-5 floor)
 * and the original's outputs bit for bit (the weights are float32 in memory either way, half
 * precision sources included, so nothing may change). Its safetensors headers must list the
 * source's tensor names and shapes, and every other file must be the source's. That the Python
 * libraries load these folders is checked by tests/fixtures/verify_saved.py (developer-run). */
#define _GNU_SOURCE
#include "harness.h"
#include "tmproot.h"

#include <ftw.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/file.h"
#include "core/mem.h"
#include "core/npy.h"
#include "encoders/checkpoint.h"
#include "encoders/safetensors_write.h"

#define FIX "tests/fixtures/models"


static const char *fmt_path(const char *fmt, ...) {
    static char buf[8][2048];
    static int k = 0;
    k = (k + 1) % 8;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf[k], sizeof buf[k], fmt, ap);
    va_end(ap);
    return buf[k];
}

static int setup(void **s) {
    (void)s;
    return tmproot_make("kst_ckpt");
}

static int teardown(void **s) {
    (void)s;
    return tmproot_remove();
}

static kst_encoder *open_enc(const char *dir) {
    kst_encoder *e = NULL;
    kst_error err;
    assert_ok(kst_encoder_open(dir, KST_ROLE_AUTO, &e, &err), &err);
    return e;
}

static void load_npy(const char *path, kst_npy *a) {
    kst_error err;
    assert_ok(kst_npy_read(path, a, &err), &err);
}

static int read_all(const char *path, char **data, size_t *len) {
    kst_error err;
    return kst_read_file(path, data, len, &err);
}

/* ------------------------------------------------------------------------------------------ */
/* outputs */

static void split_pairs(char **lines, size_t n, const char **q, const char **p) {
    for (size_t i = 0; i < n; i++) {
        char *tab = strchr(lines[i], '\t');
        assert_non_null(tab);
        *tab = '\0';
        q[i] = lines[i];
        p[i] = tab + 1;
    }
}

/* Scores of pairs.tsv: saved vs reference (tolerance) and vs original (bits). */
static void check_scores(const char *model, kst_encoder *orig, kst_encoder *saved) {
    char **lines;
    size_t n = read_lines(fmt_path(FIX "/%s/kestrel_ref/pairs.tsv", model), &lines);
    const char **q = malloc(n * sizeof *q), **p = malloc(n * sizeof *p);
    split_pairs(lines, n, q, p);
    size_t ns = kst_encoder_num_scores(saved);
    float *a = malloc(n * ns * sizeof(float)), *b = malloc(n * ns * sizeof(float));
    kst_error err;
    assert_ok(kst_encoder_score(orig, q, NULL, p, NULL, n, 0, 0, a, &err), &err);
    assert_ok(kst_encoder_score(saved, q, NULL, p, NULL, n, 0, 0, b, &err), &err);
    kst_npy want;
    load_npy(fmt_path(FIX "/%s/kestrel_ref/scores.npy", model), &want);
    assert_int_equal(want.count, n * ns);
    assert_close_f32(fmt_path("%s saved scores", model), b, want.data, n * ns, 1e-5, 1e-4);
    assert_memory_equal(a, b, n * ns * sizeof(float));
    kst_npy_free(&want);
    free(a);
    free(b);
    free(q);
    free(p);
    free_lines(lines, n);
}

static void check_dense(const char *model, kst_encoder *orig, kst_encoder *saved) {
    char **texts;
    size_t n = read_lines(fmt_path(FIX "/%s/kestrel_ref/texts.txt", model), &texts);
    size_t dim = saved->dim;
    assert_int_equal(dim, orig->dim);
    float *a = malloc(n * dim * sizeof(float)), *b = malloc(n * dim * sizeof(float));
    kst_error err;
    assert_ok(kst_encoder_embed(orig, (const char *const *)texts, NULL, n, 0, 0, 5, a, &err), &err);
    assert_ok(kst_encoder_embed(saved, (const char *const *)texts, NULL, n, 0, 0, 5, b, &err), &err);
    kst_npy want;
    load_npy(fmt_path(FIX "/%s/kestrel_ref/emb.npy", model), &want);
    assert_int_equal(want.count, n * dim);
    assert_close_f32(fmt_path("%s saved emb", model), b, want.data, n * dim, 1e-4, 0);
    assert_memory_equal(a, b, n * dim * sizeof(float));
    kst_npy_free(&want);
    free(a);
    free(b);
    free_lines(texts, n);
}

static void check_colbert(const char *model, kst_encoder *orig, kst_encoder *saved) {
    const char *files[2] = {"queries.txt", "texts.txt"}, *refs[2] = {"query_emb.npy", "doc_emb.npy"};
    for (int is_query = 1; is_query >= 0; is_query--) {
        char **texts;
        size_t n = read_lines(fmt_path(FIX "/%s/kestrel_ref/%s", model, files[1 - is_query]), &texts);
        float *va, *vb;
        size_t ta, tb;
        int64_t *oa = malloc((n + 1) * sizeof *oa), *ob = malloc((n + 1) * sizeof *ob);
        kst_error err;
        assert_ok(kst_encoder_embed_tokens(orig, (const char *const *)texts, NULL, n, is_query, 0, 4,
                                           &va, &ta, oa, &err), &err);
        assert_ok(kst_encoder_embed_tokens(saved, (const char *const *)texts, NULL, n, is_query, 0, 4,
                                           &vb, &tb, ob, &err), &err);
        kst_npy want;
        load_npy(fmt_path(FIX "/%s/kestrel_ref/%s", model, refs[1 - is_query]), &want);
        assert_int_equal(ta, tb);
        assert_int_equal(want.count, tb * saved->dim);
        assert_close_f32(fmt_path("%s saved %s", model, refs[1 - is_query]), vb, want.data, want.count, 1e-4, 0);
        assert_memory_equal(oa, ob, (n + 1) * sizeof *oa);
        assert_memory_equal(va, vb, ta * saved->dim * sizeof(float));
        kst_npy_free(&want);
        kst_free(va);
        kst_free(vb);
        free(oa);
        free(ob);
        free_lines(texts, n);
    }
}

/* ------------------------------------------------------------------------------------------ */
/* files */

/* The saved file lists the source's tensors (names, shapes) as float32 (other dtypes kept), in
 * a header the reader validates, padded to 8 bytes, with metadata where the source had it. */
static void check_header(const char *src, const char *dst) {
    kst_safetensors a, b;
    kst_error err;
    assert_ok(kst_safetensors_open(src, &a, &err), &err);
    assert_ok(kst_safetensors_open(dst, &b, &err), &err);
    assert_int_equal(a.n, b.n);
    for (size_t i = 0; i < a.n; i++) {
        const kst_st_tensor *x = &a.tensors[i], *y = &b.tensors[i];
        if (strcmp(x->name, y->name) != 0) fail_msg("%s: tensor %zu is %s, source has %s", dst, i, y->name, x->name);
        assert_int_equal(x->ndim, y->ndim);
        for (int d = 0; d < x->ndim; d++) assert_int_equal(x->shape[d], y->shape[d]);
        if (x->dtype == KST_DT_OTHER) assert_string_equal(x->dtype_name, y->dtype_name);
        else assert_string_equal(y->dtype_name, "F32");
    }
    uint64_t hl = 0;
    for (int k = 7; k >= 0; k--) hl = hl << 8 | b.map.data[k];
    assert_int_equal(hl % 8, 0);
    int am = memcmp(a.map.data + 8, "{\"__metadata__\":{\"format\":\"pt\"}", 31) == 0;
    int bm = memcmp(b.map.data + 8, "{\"__metadata__\":{\"format\":\"pt\"}", 31) == 0;
    assert_int_equal(am, bm);
    kst_safetensors_close(&a);
    kst_safetensors_close(&b);
}

static char g_walk_src[2048], g_walk_dst[2048];
static int g_half;

/* Every non-weight file of the source is in the copy with the same bytes (config.json: dtype now
 * float32 for half-precision sources); every safetensors file has its counterpart. */
static int cmp_entry(const char *p, const struct stat *sb, int flag, struct FTW *f) {
    (void)sb, (void)f;
    if (flag != FTW_F) return 0;
    const char *rel = p + strlen(g_walk_src) + 1;
    const char *other = fmt_path("%s/%s", g_walk_dst, rel);
    size_t rl = strlen(rel);
    if (rl > 12 && strcmp(rel + rl - 12, ".safetensors") == 0) {
        check_header(p, other);
        return 0;
    }
    char *x, *y;
    size_t xl, yl;
    assert_int_equal(read_all(p, &x, &xl), KST_OK);
    if (read_all(other, &y, &yl) != KST_OK) fail_msg("%s was not copied", other);
    if (g_half && strcmp(rel, "config.json") == 0) {
        assert_non_null(strstr(y, "\"dtype\": \"float32\""));
        assert_null(strstr(y, "float16"));
        char *at = strstr(x, "\"dtype\": \"");
        assert_non_null(at);
        /* the rest of the file is untouched: undo the one edit and compare */
        char *v = at + 10, *end = strchr(v, '"');
        size_t head = (size_t)(v - x);
        assert_memory_equal(x, y, head);
        assert_string_equal(y + head + 7, end);
    } else {
        if (xl != yl || memcmp(x, y, xl) != 0) fail_msg("%s differs from %s", other, p);
    }
    kst_free(x);
    kst_free(y);
    return 0;
}

/* Nothing in the copy that the source lacks (no temporary files either). */
static int extra_entry(const char *p, const struct stat *sb, int flag, struct FTW *f) {
    (void)sb, (void)f;
    if (flag != FTW_F) return 0;
    const char *rel = p + strlen(g_walk_dst) + 1;
    if (!kst_path_exists(fmt_path("%s/%s", g_walk_src, rel))) fail_msg("%s has no source counterpart", p);
    return 0;
}

static void check_tree(const char *src, const char *dst, int half) {
    snprintf(g_walk_src, sizeof g_walk_src, "%s", src);
    snprintf(g_walk_dst, sizeof g_walk_dst, "%s", dst);
    g_half = half;
    assert_int_equal(nftw(src, cmp_entry, 16, FTW_PHYS), 0);
    assert_int_equal(nftw(dst, extra_entry, 16, FTW_PHYS), 0);
}

/* ------------------------------------------------------------------------------------------ */
/* round trips */

static void round_trip(const char *model, int half) {
    char src[1024], out[1024];
    snprintf(src, sizeof src, FIX "/%s", model);
    snprintf(out, sizeof out, "%s/%s", g_root, model);
    kst_encoder *orig = open_enc(src);
    kst_error err;
    assert_ok(kst_checkpoint_save(orig, out, &err), &err);
    kst_encoder *saved = open_enc(out);
    assert_int_equal(saved->role, orig->role);
    assert_int_equal(saved->bert.num_params, orig->bert.num_params);
    assert_memory_equal(saved->bert.param_mem, orig->bert.param_mem, orig->bert.num_params * sizeof(float));
    if (orig->role == KST_ROLE_DENSE) {
        check_dense(model, orig, saved);
        check_scores(model, orig, saved);
    } else if (orig->role == KST_ROLE_COLBERT) {
        check_colbert(model, orig, saved);
        check_scores(model, orig, saved);
    } else {
        check_scores(model, orig, saved);
    }
    check_tree(src, out, half);
    /* float32 sources come out byte for byte as the Python library wrote them */
    if (!half)
        for (size_t i = 0; i < orig->n_weight_files; i++) {
            char *x, *y;
            size_t xl, yl;
            const char *rel = orig->weight_files[i] + strlen(orig->dir) + 1;
            assert_int_equal(read_all(orig->weight_files[i], &x, &xl), KST_OK);
            assert_int_equal(read_all(fmt_path("%s/%s", out, rel), &y, &yl), KST_OK);
            if (xl != yl || memcmp(x, y, xl) != 0) fail_msg("%s/%s is not byte-identical to the source", out, rel);
            kst_free(x);
            kst_free(y);
        }
    kst_encoder_free(saved);

    /* Changed weights are what gets saved: perturb every parameter, save again (over the first
     * save), reopen, and every float must come back exactly, un-stacked QKV included. */
    for (size_t i = 0; i < orig->bert.num_params; i++) orig->bert.param_mem[i] += 0.001f * (float)(i % 13 + 1);
    assert_ok(kst_checkpoint_save(orig, out, &err), &err);
    saved = open_enc(out);
    assert_memory_equal(saved->bert.param_mem, orig->bert.param_mem, orig->bert.num_params * sizeof(float));
    kst_encoder_free(saved);
    kst_encoder_free(orig);
}

static void test_st_bert_mean(void **s) { (void)s; round_trip("st_bert_mean", 0); }
static void test_st_bert_cls_dense(void **s) { (void)s; round_trip("st_bert_cls_dense", 0); }
static void test_st_distilbert_max_fp16(void **s) { (void)s; round_trip("st_distilbert_max", 1); }
static void test_st_tokjson_bf16(void **s) { (void)s; round_trip("st_bert_sqrtlen_tokjson", 1); }
static void test_bare_bert(void **s) { (void)s; round_trip("bare_bert", 0); }
static void test_bare_bert_prefixed(void **s) { (void)s; round_trip("bare_bert_prefixed", 0); }
static void test_colbert(void **s) { (void)s; round_trip("colbert", 0); }
static void test_cross_bert(void **s) { (void)s; round_trip("cross_bert", 0); }
static void test_cross_distilbert(void **s) { (void)s; round_trip("cross_distilbert", 0); }

/* ------------------------------------------------------------------------------------------ */
/* the writer on its own */

static void test_writer(void **s) {
    (void)s;
    float f[6] = {1, -2, 3.5f, 0, 1e-30f, -0.0f};
    unsigned short h[3] = {0x3c00, 0xc000, 0x0001}; /* 1, -2, smallest F16 subnormal */
    unsigned short bf[2] = {0x3f80, 0xc040};         /* 1, -3 */
    int64_t ids[4] = {0, 1, 2, 3};
    kst_st_out t[4] = {
        {"b.f32", "F32", KST_DT_F32, 2, {2, 3}, f, 0},
        {"a.f16", "F32", KST_DT_F16, 1, {3}, h, 0},
        {"c.bf16", "F32", KST_DT_BF16, 1, {2}, bf, 0},
        {"pos \"ids\"", "I64", KST_DT_OTHER, 2, {1, 4}, ids, sizeof ids}};
    const char *path = fmt_path("%s/writer.safetensors", g_root);
    kst_error err;
    assert_ok(kst_safetensors_write(path, t, 4, "pt", &err), &err);
    kst_safetensors st;
    assert_ok(kst_safetensors_open(path, &st, &err), &err);
    assert_int_equal(st.n, 4);
    const kst_st_tensor *x = kst_safetensors_find(&st, "b.f32");
    assert_non_null(x);
    assert_memory_equal(x->data, f, sizeof f);
    x = kst_safetensors_find(&st, "a.f16");
    float want[3] = {1, -2, kst_f16_to_f32(1)}, got[3];
    size_t sh[1] = {3};
    assert_ok(kst_st_tensor_to_f32(&st, x, 1, sh, got, &err), &err);
    assert_memory_equal(got, want, sizeof want);
    assert_string_equal(x->dtype_name, "F32");
    x = kst_safetensors_find(&st, "pos \"ids\"");
    assert_non_null(x);
    assert_string_equal(x->dtype_name, "I64");
    assert_memory_equal(x->data, ids, sizeof ids);
    /* the I64 tensor (largest element) comes first in the data, as the Python library orders it */
    assert_ptr_equal(x->data, st.map.data + 8 + (st.map.data[0] | st.map.data[1] << 8));
    kst_safetensors_close(&st);
    /* no metadata, no tensors: the smallest valid file */
    assert_ok(kst_safetensors_write(path, NULL, 0, NULL, &err), &err);
    assert_ok(kst_safetensors_open(path, &st, &err), &err);
    assert_int_equal(st.n, 0);
    kst_safetensors_close(&st);

    /* refused: duplicate name, unknown dtype, F32 from raw bytes, a byte count that disagrees */
    kst_st_out dup[2] = {t[0], t[0]};
    assert_int_equal(kst_safetensors_write(path, dup, 2, "pt", &err), KST_ERR_INVALID);
    assert_msg_has(err.msg, "given twice");
    kst_st_out bad = t[0];
    bad.dtype = "F33";
    assert_int_equal(kst_safetensors_write(path, &bad, 1, "pt", &err), KST_ERR_INVALID);
    assert_msg_has(err.msg, "b.f32");
    bad = t[3];
    bad.nbytes = 3;
    assert_int_equal(kst_safetensors_write(path, &bad, 1, "pt", &err), KST_ERR_INVALID);
    bad = t[0];
    bad.src = KST_DT_OTHER;
    assert_int_equal(kst_safetensors_write(path, &bad, 1, "pt", &err), KST_ERR_INVALID);
    /* the failed calls left the last good file in place */
    assert_ok(kst_safetensors_open(path, &st, &err), &err);
    kst_safetensors_close(&st);
    /* a folder that does not exist: an I/O error naming it, no file made */
    assert_int_equal(kst_safetensors_write(fmt_path("%s/no/such/x.safetensors", g_root), t, 1, "pt", &err), KST_ERR_IO);
    assert_msg_has(err.msg, "no/such");
}

/* ------------------------------------------------------------------------------------------ */
/* errors */

static void test_refuses_source(void **s) {
    (void)s;
    const char *src = FIX "/bare_bert";
    kst_encoder *e = open_enc(src);
    char abs[4096];
    assert_non_null(realpath(src, abs));
    const char *same[] = {src, FIX "/bare_bert/", FIX "/bare_bert/.", FIX "/../models/bare_bert", abs};
    kst_error err;
    for (size_t i = 0; i < sizeof same / sizeof same[0]; i++) {
        assert_int_equal(kst_checkpoint_save(e, same[i], &err), KST_ERR_INVALID);
        assert_msg_has(err.msg, "never overwritten");
    }
    /* inside the source: also refused, and nothing is created there */
    assert_int_equal(kst_checkpoint_save(e, FIX "/bare_bert/out", &err), KST_ERR_INVALID);
    assert_false(kst_path_exists(FIX "/bare_bert/out"));
    kst_encoder_free(e);
}

static void test_unwritable(void **s) {
    (void)s;
    kst_encoder *e = open_enc(FIX "/st_bert_mean");
    kst_error err;
    /* a regular file where a folder must go */
    const char *file = fmt_path("%s/a_file", g_root);
    FILE *fp = fopen(file, "w");
    assert_non_null(fp);
    fclose(fp);
    assert_int_equal(kst_checkpoint_save(e, fmt_path("%s/sub", file), &err), KST_ERR_IO);
    assert_msg_has(err.msg, "a_file");
    assert_int_equal(kst_checkpoint_save(e, file, &err), KST_ERR_IO);
    /* a read-only folder (root ignores permissions, so only checked as another user) */
    if (geteuid() != 0) {
        const char *ro = fmt_path("%s/readonly", g_root);
        assert_int_equal(mkdir(ro, 0555), 0);
        assert_int_equal(kst_checkpoint_save(e, ro, &err), KST_ERR_IO);
        assert_msg_has(err.msg, "readonly");
        assert_int_equal(kst_checkpoint_save(e, fmt_path("%s/x", ro), &err), KST_ERR_IO);
        chmod(ro, 0755);
    }
    kst_encoder_free(e);
}

static int g_tmp_found;
static int tmp_entry(const char *p, const struct stat *sb, int flag, struct FTW *f) {
    (void)sb, (void)flag, (void)f;
    if (strstr(p, ".tmp.")) g_tmp_found = 1;
    return 0;
}

/* Every allocation of a save may fail: KST_ERR_NOMEM, no leak (ASan), no temporary file left,
 * and a later save into the same folder works and round-trips. */
static void alloc_failures(const char *model) {
    kst_encoder *e = open_enc(fmt_path(FIX "/%s", model));
    const char *out = fmt_path("%s/nomem_%s", g_root, model);
    char outbuf[2048];
    snprintf(outbuf, sizeof outbuf, "%s", out);
    long k;
    for (k = 1; k < 100000; k++) {
        kst_mem_fail_after(k);
        kst_error err;
        int rc = kst_checkpoint_save(e, outbuf, &err);
        kst_mem_fail_after(0);
        g_tmp_found = 0;
        if (kst_path_exists(outbuf)) nftw(outbuf, tmp_entry, 16, FTW_PHYS);
        if (g_tmp_found) fail_msg("allocation %ld: a temporary file was left in %s", k, outbuf);
        if (rc == KST_OK) break;
        if (rc != KST_ERR_NOMEM) fail_msg("allocation %ld: %s: %s", k, kst_status_name(rc), err.msg);
    }
    assert_true(k > 1);
    kst_encoder *saved = open_enc(outbuf);
    assert_memory_equal(saved->bert.param_mem, e->bert.param_mem, e->bert.num_params * sizeof(float));
    kst_encoder_free(saved);
    kst_encoder_free(e);
}

static void test_allocation_failures(void **s) {
    (void)s;
    alloc_failures("st_bert_cls_dense");
    alloc_failures("st_distilbert_max");
    alloc_failures("colbert");
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_writer),
        cmocka_unit_test(test_st_bert_mean),
        cmocka_unit_test(test_st_bert_cls_dense),
        cmocka_unit_test(test_st_distilbert_max_fp16),
        cmocka_unit_test(test_st_tokjson_bf16),
        cmocka_unit_test(test_bare_bert),
        cmocka_unit_test(test_bare_bert_prefixed),
        cmocka_unit_test(test_colbert),
        cmocka_unit_test(test_cross_bert),
        cmocka_unit_test(test_cross_distilbert),
        cmocka_unit_test(test_refuses_source),
        cmocka_unit_test(test_unwritable),
        cmocka_unit_test(test_allocation_failures),
    };
    return cmocka_run_group_tests_name("checkpoint_write", tests, setup, teardown);
}
