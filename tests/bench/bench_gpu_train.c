/* bench_gpu_train.c - the Margin-MSE training step on the GPU (train/trainer_gpu.h), printed as
 * JSON for tests/gpu/report.py to set beside PyTorch's same step measured in the same run
 * (tests/bench/bench_gpu_train_torch.py). Built and run by tests/gpu/run_all.sh.
 *
 * usage: bench_gpu_train MODEL_DIR B TQ TP REPS DROPOUT [DIM [IB_WEIGHT]]
 *   B triples (a query, a positive, a negative), queries of TQ tokens and passages of TP, every
 *   token valid, random ids (1000..21000, [CLS] first) copied from the host on every step, as the
 *   anchor's; mean pooling + Normalize, Margin-MSE against random teacher scores, AdamW (lr 2e-5,
 *   weight decay 0.01 on matrices and embeddings only), DROPOUT on the four sites of the CPU
 *   trainer. 3 warm-up steps, then REPS steps timed one by one (each ends when the loss is back on
 *   the host); median. Peak memory: the trainer's own GPU buffers at their largest.
 *   KESTREL_GPU_TRAIN_FLASH=0 measures the materialised (T x T) attention instead of the flash
 *   one; the JSON says which ran ("attention").
 *   DIM > 0: a ColBERT student instead (projection, per-token L2 norm, MaxSim and their backward):
 *   the model plus a linear (DIM, C) without bias, weights uniform in +-1/sqrt(C) (seed 7, as the
 *   anchor's `colbert` command; the same draws are not needed: timings only), queries entering
 *   MaxSim with every token, passages keeping every token; IB_WEIGHT times the in-batch
 *   cross-entropy added to the loss (bi-encoder or ColBERT). JSON "bench": "train_colbert". */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/gpu.h"
#include "encoders/encoder.h"
#include "train/optim.h"
#include "train/trainer_gpu.h"

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}
static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}
static void die(const char *what, const kst_error *err) {
    fprintf(stderr, "bench_gpu_train: %s: %s\n", what, err ? err->msg : "");
    exit(1);
}

/* train/trainer.c's: decay on matrices and embeddings, not on biases or LayerNorms. */
static const int DECAY[KST_BERT_NPARAMS] = {1, 1, 1, 0, 0, 1, 0, 1, 0, 0, 0, 1,
                                            0, 1, 0, 0, 0, 1, 0, 1, 0, 1, 1, 0};

int main(int argc, char **argv) {
    if (argc < 7) {
        fprintf(stderr, "usage: bench_gpu_train MODEL_DIR B TQ TP REPS DROPOUT [DIM [IB_WEIGHT]]\n");
        return 2;
    }
    kst_error err;
    kst_encoder *e = NULL;
    if (kst_encoder_open(argv[1], KST_ROLE_AUTO, &e, &err) != KST_OK) die(argv[1], &err);
    size_t B = (size_t)atol(argv[2]), Tq = (size_t)atol(argv[3]), Tp = (size_t)atol(argv[4]), n = 2;
    int reps = atoi(argv[5]);
    float dropout = (float)atof(argv[6]);
    size_t D = argc > 7 ? (size_t)atol(argv[7]) : 0;
    float ibw = argc > 8 ? (float)atof(argv[8]) : 0.0f;
    /* ColBERT: the transformer with a linear to D */
    kst_bert cm;
    const kst_bert *m = &e->bert;
    if (D) {
        kst_bert_config cfg = e->bert.cfg;
        cfg.proj_dim = D;
        if (kst_bert_alloc(&cm, &cfg, &err) != KST_OK) die("model", &err);
        size_t at = 0, from = 0;
        for (int i = 0; i < KST_BERT_NPARAMS; i++) {
            if (cm.param_sizes[i] == e->bert.param_sizes[i])
                memcpy(cm.param_mem + at, e->bert.param_mem + from, cm.param_sizes[i] * sizeof(float));
            at += cm.param_sizes[i], from += e->bert.param_sizes[i];
        }
        uint64_t r = 7;
        float a = 1.0f / sqrtf((float)cfg.C);
        for (size_t i = 0; i < D * cfg.C; i++)
            r = r * 6364136223846793005ull + 1442695040888963407ull,
            cm.params.projw[i] = a * (2.0f * (float)((r >> 40) & 0xFFFFFF) / 16777216.0f - 1.0f);
        m = &cm;
    }
    unsigned char *decay = malloc(m->num_params);
    kst_decay_mask_fill(decay, m->param_sizes, DECAY, KST_BERT_NPARAMS);
    kst_gpu_trainer *t = NULL;
    if (kst_gpu_trainer_create(m, D ? 0 : KST_POOL_MEAN, D ? 0 : 1, decay, &t, &err) != KST_OK) die("GPU trainer", &err);
    kst_gpu_trainer_set_in_batch(t, ibw);
    int32_t *qids = malloc(B * Tq * sizeof *qids), *pids = malloc(B * n * Tp * sizeof *pids);
    int *qv = malloc(B * sizeof *qv), *pv = malloc(B * n * sizeof *pv);
    unsigned char *keep = malloc(B * n * Tp);
    float *teacher = malloc(B * n * sizeof *teacher);
    memset(keep, 1, B * n * Tp);
    uint64_t r = 42;
    for (size_t i = 0; i < B * Tq; i++) r = r * 6364136223846793005ull + 1442695040888963407ull, qids[i] = i % Tq ? 1000 + (int32_t)((r >> 33) % 20000) : 101;
    for (size_t i = 0; i < B * n * Tp; i++) r = r * 6364136223846793005ull + 1442695040888963407ull, pids[i] = i % Tp ? 1000 + (int32_t)((r >> 33) % 20000) : 101;
    for (size_t i = 0; i < B; i++) qv[i] = (int)Tq;
    for (size_t i = 0; i < B * n; i++) pv[i] = (int)Tp;
    for (size_t i = 0; i < B * n; i++) r = r * 6364136223846793005ull + 1442695040888963407ull, teacher[i] = (float)((r >> 40) % 1000) / 100.0f;
    /* encoders/bert_gpu_train.cu's choice: flash for head sizes 16, 32 and 64 unless
     * KESTREL_GPU_TRAIN_FLASH=0 */
    size_t hs = m->cfg.C / m->cfg.NH;
    const char *fe = getenv("KESTREL_GPU_TRAIN_FLASH");
    const char *attention = (hs == 16 || hs == 32 || hs == 64) && !(fe && !strcmp(fe, "0")) ? "flash" : "materialised";
    kst_gpu_batch q = {qids, NULL, qv, B, Tq, D ? qv : NULL, NULL}, p = {pids, NULL, pv, B * n, Tp, D ? pv : NULL, D ? keep : NULL};
    kst_adamw_config ac = kst_adamw_defaults();
    ac.weight_decay = 0.01;
    double *ts = malloc((size_t)reps * sizeof *ts), *tq = malloc((size_t)reps * sizeof *tq);
    float loss = 0, first = 0, gnorm = 0;
    for (int i = 0; i < 3 + reps; i++) {
        double t0 = now();
        if (kst_gpu_trainer_forward_backward(t, &q, &p, teacher, n, dropout, 2 * (uint64_t)i + 1, 2 * (uint64_t)i + 2, &err) != KST_OK)
            die("step", &err);
        double t1 = now(); /* the host's share: validating ids, copies, launching */
        if (kst_gpu_trainer_update(t, 0, 2e-5, i + 1, &ac, 0, &loss, &gnorm, &err) != KST_OK) die("update", &err);
        if (i >= 3) ts[i - 3] = now() - t0, tq[i - 3] = t1 - t0;
        if (i == 0) first = loss;
    }
    qsort(ts, (size_t)reps, sizeof *ts, cmp_double);
    double med = ts[reps / 2];
    qsort(tq, (size_t)reps, sizeof *tq, cmp_double);
    printf("{\"bench\": \"%s\", \"model\": \"%s\", \"triples\": %zu, \"Tq\": %zu, \"Tp\": %zu, \"dim\": %zu, "
           "\"in_batch_weight\": %g, \"dropout\": %g, \"attention\": \"%s\", \"step_ms\": %.3f, \"enqueue_ms\": %.3f, \"triples_per_s\": %.1f, \"gpu_peak_bytes\": %zu, \"loss_first\": %.5f, \"loss_last\": %.5f, "
           "\"device\": \"%s\"}\n",
           D ? "train_colbert" : "train", argv[1], B, Tq, Tp, D, (double)ibw, (double)dropout, attention, med * 1e3, tq[reps / 2] * 1e3, (double)B / med, kst_gpu_trainer_peak_bytes(t), (double)first,
           (double)loss, kst_gpu_describe());
    kst_gpu_trainer_free(t);
    if (D) kst_bert_free(&cm);
    kst_encoder_free(e);
    free(decay), free(qids), free(pids), free(qv), free(pv), free(keep), free(teacher), free(ts), free(tq);
    return 0;
}
