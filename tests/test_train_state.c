/* test_train_state.c - the training state file (train/state.h): round trip, and every way a file
 * can be wrong (missing, another model's, truncated, foreign) is refused with the file named.
 * That resuming from it equals uninterrupted training is tested end to end in
 * tests/cli/test_train_cli.sh (shuffle, dropout, epochs, kill -9 mid-save). */
#define _GNU_SOURCE
#include "harness.h"

#include <unistd.h>

#include "core/file.h"
#include "core/mem.h"
#include "train/state.h"

#define N 1000

static char g_path[256];

static int setup(void **s) {
    (void)s;
    const char *t = getenv("TMPDIR");
    snprintf(g_path, sizeof g_path, "%s/kst_state_XXXXXX", t && *t ? t : "/tmp");
    int fd = mkstemp(g_path);
    if (fd < 0) return -1;
    close(fd);
    return 0;
}

static int teardown(void **s) {
    (void)s;
    unlink(g_path);
    return 0;
}

static void fill(float *a, float *b, float *c) {
    for (int i = 0; i < N; i++) {
        a[i] = (float)i * 0.5f - 3.0f;
        b[i] = 1.0f / (float)(i + 1);
        c[i] = -(float)i;
    }
}

static void round_trip(void **s) {
    (void)s;
    static float a[N], b[N], c[N], x[N], y[N], z[N];
    fill(a, b, c);
    const float *blocks[3] = {a, b, c};
    kst_error err;
    assert_ok(kst_train_state_write(g_path, "{\"step\": 7}", blocks, 3, N, &err), &err);
    char tmp[300];
    snprintf(tmp, sizeof tmp, "%s.tmp", g_path);
    assert_false(kst_path_exists(tmp)); /* renamed into place */
    char *json = NULL;
    float *out[3] = {x, y, z};
    assert_ok(kst_train_state_read(g_path, &json, out, 3, N, &err), &err);
    assert_string_equal(json, "{\"step\": 7}");
    assert_memory_equal(a, x, sizeof a);
    assert_memory_equal(b, y, sizeof b);
    assert_memory_equal(c, z, sizeof c);
    kst_free(json);
    /* a second write replaces the first whole */
    a[0] = 42;
    assert_ok(kst_train_state_write(g_path, "{}", blocks, 3, N, &err), &err);
    assert_ok(kst_train_state_read(g_path, &json, out, 3, N, &err), &err);
    assert_string_equal(json, "{}");
    assert_true(x[0] == 42.0f);
    kst_free(json);
}

static void refusals(void **s) {
    (void)s;
    static float a[N], b[N], c[N];
    fill(a, b, c);
    const float *blocks[3] = {a, b, c};
    float *out[3] = {a, b, c};
    kst_error err;
    char *json = NULL, missing[300];
    snprintf(missing, sizeof missing, "%s.none", g_path);
    assert_int_equal(kst_train_state_read(missing, &json, out, 3, N, &err), KST_ERR_NOTFOUND);
    assert_msg_has(err.msg, missing);
    assert_ok(kst_train_state_write(g_path, "{}", blocks, 3, N, &err), &err);
    /* another model: other parameter count */
    assert_int_equal(kst_train_state_read(g_path, &json, out, 3, N - 1, &err), KST_ERR_FORMAT);
    assert_msg_has(err.msg, "another model");
    assert_null(json);
    /* truncated by one byte */
    assert_int_equal(truncate(g_path, (off_t)(64 + 3 * N * sizeof(float) - 1)), 0);
    assert_int_equal(kst_train_state_read(g_path, &json, out, 3, N, &err), KST_ERR_FORMAT);
    assert_msg_has(err.msg, "truncated");
    /* not a state file */
    assert_ok(kst_write_file_atomic(g_path, "{\"step\": 1}\n and more text, well past 32 bytes", 47, &err), &err);
    assert_int_equal(kst_train_state_read(g_path, &json, out, 3, N, &err), KST_ERR_FORMAT);
    assert_msg_has(err.msg, "bad magic");
    assert_int_equal(truncate(g_path, 3), 0);
    assert_int_equal(kst_train_state_read(g_path, &json, out, 3, N, &err), KST_ERR_FORMAT);
    assert_msg_has(err.msg, "too short");
    /* unwritable place: nothing left behind */
    assert_int_equal(kst_train_state_write("/nonexistent-dir/state.bin", "{}", blocks, 3, N, &err), KST_ERR_IO);
    assert_msg_has(err.msg, "/nonexistent-dir/state.bin.tmp");
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(round_trip),
        cmocka_unit_test(refusals),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
