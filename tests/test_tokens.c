/* test_tokens.c - the float16 token store: conversion against numpy, round trips, crash tail. */
#include "harness.h"

#include <unistd.h>

#include "core/npy.h"
#include "index/tokens.h"

/* numpy's float32 -> float16 (round to nearest even) is the reference, bit for bit. */
static void test_f16_matches_numpy(void **s) {
    (void)s;
    kst_npy in, bits;
    kst_error err;
    assert_ok(kst_npy_read("tests/fixtures/tokens/f16_in.npy", &in, &err), &err);
    assert_ok(kst_npy_read("tests/fixtures/tokens/f16_bits.npy", &bits, &err), &err);
    assert_int_equal(in.count, bits.count);
    const float *v = in.data;
    const int32_t *b = bits.data;
    for (size_t i = 0; i < in.count; i++)
        if (kst_f32_to_f16(v[i]) != (unsigned short)b[i])
            fail_msg("value %zu (%.9g): got 0x%04x, numpy 0x%04x", i, v[i], kst_f32_to_f16(v[i]), (unsigned)b[i]);
    kst_npy_free(&in);
    kst_npy_free(&bits);
}

static void test_round_trip_and_reopen(void **s) {
    (void)s;
    char path[] = "/tmp/kst_tokens_XXXXXX";
    int fd = mkstemp(path);
    close(fd);
    unlink(path);
    kst_tokens *t;
    kst_error err;
    assert_ok(kst_tokens_open(path, 8, 1, &t, &err), &err);
    float rows[3 * 8], back[3 * 8];
    for (int i = 0; i < 24; i++) rows[i] = (float)i * 0.25f - 2.0f; /* exact in float16 */
    uint64_t first, second;
    assert_ok(kst_tokens_append(t, rows, 2, &first, &err), &err);
    assert_ok(kst_tokens_append(t, rows + 16, 1, &second, &err), &err);
    assert_int_equal(first, 0);
    assert_int_equal(second, 2);
    assert_ok(kst_tokens_sync(t, &err), &err);
    kst_tokens_close(t);
    /* a torn row at the end (a crash mid-append) is ignored */
    FILE *fp = fopen(path, "ab");
    fwrite("\x01\x02\x03", 1, 3, fp);
    fclose(fp);
    assert_ok(kst_tokens_open(path, 8, 0, &t, &err), &err);
    assert_int_equal(kst_tokens_rows(t), 3);
    assert_ok(kst_tokens_read(t, 0, 3, back, &err), &err);
    assert_memory_equal(rows, back, sizeof rows);
    assert_int_equal(kst_tokens_read(t, 2, 2, back, &err), KST_ERR_FORMAT);
    assert_msg_has(err.msg, "requested but the store has 3");
    kst_tokens_close(t);
    assert_int_equal(kst_tokens_open(path, 16, 0, &t, &err), KST_ERR_SHAPE);
    assert_msg_has(err.msg, "dim 8, expected 16");
    unlink(path);
}

static void test_bad_file(void **s) {
    (void)s;
    kst_tokens *t;
    kst_error err;
    assert_int_equal(kst_tokens_open("tests/fixtures/tokens/f16_in.npy", 8, 0, &t, &err), KST_ERR_FORMAT);
    assert_msg_has(err.msg, "bad magic");
    assert_int_equal(kst_tokens_open("/nonexistent/dir/tokens.f16", 8, 0, &t, &err), KST_ERR_IO);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_f16_matches_numpy),
        cmocka_unit_test(test_round_trip_and_reopen),
        cmocka_unit_test(test_bad_file),
    };
    return cmocka_run_group_tests_name("tokens", tests, NULL, NULL);
}
