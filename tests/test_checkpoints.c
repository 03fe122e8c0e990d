/* test_checkpoints.c - safetensors and config.json loading, broken files included.
 *
 * tests/fixtures/models/bad/ holds checkpoints that make_fixtures.py broke in one way each (its
 * EXPECT file says how); ok_control is the same tiny model intact. Each must fail with a message
 * that names the file and the tensor or key at fault. */
#include "harness.h"

#include "core/check.h"
#include "core/mem.h"
#include "encoders/bert.h"
#include "encoders/safetensors.h"

#define BAD "tests/fixtures/models/bad/"

/* Loads config + weights of a folder the way the encoder does; returns the status. */
static int load_dir(const char *dir, kst_error *err) {
    char path[1024];
    kst_bert_config cfg;
    kst_bert m = {0};
    kst_safetensors st = {0};
    snprintf(path, sizeof path, "%s/config.json", dir);
    int rc = kst_bert_config_load(path, &cfg, err);
    cfg.NL = 0; /* a bare BertModel: no classifier head */
    if (rc == KST_OK) rc = kst_bert_alloc(&m, &cfg, err);
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    if (rc == KST_OK) rc = kst_safetensors_open(path, &st, err);
    if (rc == KST_OK) rc = kst_bert_load_weights(&m, &st, err);
    kst_safetensors_close(&st);
    kst_bert_free(&m);
    return rc;
}

static void expect_fail(const char *name, int code, const char *needle1, const char *needle2) {
    char dir[512];
    snprintf(dir, sizeof dir, BAD "%s", name);
    kst_error err;
    kst_error_clear(&err);
    int rc = load_dir(dir, &err);
    if (rc != code) fail_msg("%s: expected %s, got %s (%s)", name, kst_status_name(code), kst_status_name(rc), err.msg);
    assert_msg_has(err.msg, needle1);
    if (needle2) assert_msg_has(err.msg, needle2);
}

static void test_control_loads(void **s) {
    (void)s;
    kst_error err;
    assert_ok(load_dir(BAD "ok_control", &err), &err);
}

static void test_bad_checkpoints(void **s) {
    (void)s;
    const char *q = "encoder.layer.0.attention.self.query.weight";
    expect_fail("config_invalid_json", KST_ERR_FORMAT, "config.json", "invalid JSON at line");
    expect_fail("config_missing_hidden_size", KST_ERR_FORMAT, "config.json", "\"hidden_size\"");
    expect_fail("dtype_f64", KST_ERR_SHAPE, q, "F64");
    expect_fail("dtype_i64", KST_ERR_SHAPE, q, "I64");
    expect_fail("header_len_too_big", KST_ERR_FORMAT, "model.safetensors", "header length");
    expect_fail("header_not_json", KST_ERR_FORMAT, "model.safetensors", "invalid JSON");
    expect_fail("missing_tensor", KST_ERR_SHAPE, "missing tensor", "encoder.layer.1.output.dense.weight");
    expect_fail("offsets_out_of_range", KST_ERR_FORMAT, q, "run past the end");
    expect_fail("offsets_overlap", KST_ERR_FORMAT, "overlap", "model.safetensors");
    expect_fail("offsets_size_mismatch", KST_ERR_FORMAT, q, "expected 1024");
    expect_fail("truncated_file", KST_ERR_FORMAT, "model.safetensors", "truncated");
    expect_fail("wrong_shape", KST_ERR_SHAPE, q, "[16, 17], expected [16, 16]");
}

static void test_missing_file(void **s) {
    (void)s;
    kst_safetensors st;
    kst_error err;
    assert_int_equal(kst_safetensors_open("tests/fixtures/no/such.safetensors", &st, &err), KST_ERR_IO);
    assert_msg_has(err.msg, "no/such.safetensors");
}

/* Half-precision conversion against values torch gives for the same bit patterns. */
static void test_half_conversions(void **s) {
    (void)s;
    assert_true(kst_f16_to_f32(0x3c00) == 1.0f);
    assert_true(kst_f16_to_f32(0xc000) == -2.0f);
    assert_true(kst_f16_to_f32(0x7bff) == 65504.0f);           /* largest normal */
    assert_true(kst_f16_to_f32(0x0001) == 5.9604644775390625e-08f); /* smallest subnormal */
    assert_true(kst_f16_to_f32(0x03ff) == 6.097555160522461e-05f);  /* largest subnormal */
    assert_true(isinf(kst_f16_to_f32(0x7c00)));
    assert_true(isnan(kst_f16_to_f32(0x7e00)));
    assert_true(kst_bf16_to_f32(0x3f80) == 1.0f);
    assert_true(kst_bf16_to_f32(0x4049) == 3.140625f);
}

/* Each allocation of a load may fail; the error is KST_ERR_NOMEM and nothing leaks (ASan). */
static void test_load_allocation_failures(void **s) {
    (void)s;
    for (long k = 1; k < 1000; k++) {
        kst_mem_fail_after(k);
        kst_error err;
        int rc = load_dir(BAD "ok_control", &err);
        kst_mem_fail_after(0);
        if (rc == KST_OK) return;
        if (rc != KST_ERR_NOMEM) fail_msg("allocation %ld: %s", k, err.msg);
    }
    fail_msg("load never succeeded");
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_control_loads),
        cmocka_unit_test(test_bad_checkpoints),
        cmocka_unit_test(test_missing_file),
        cmocka_unit_test(test_half_conversions),
        cmocka_unit_test(test_load_allocation_failures),
    };
    return cmocka_run_group_tests_name("checkpoints", tests, NULL, NULL);
}
