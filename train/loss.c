/* loss.c - Margin-MSE, listwise KL, in-batch cross-entropy, MSE and BCE-with-logits: forward and
 * backward over student scores. Sums run in double so that float inputs give the loss PyTorch
 * computes in float64 to within float rounding. */
#include "train/loss.h"

#include <math.h>

/* ---------------------------------------------------------------------------------------------
 * Helpers
 * ------------------------------------------------------------------------------------------- */

/* log(sum_j exp(scale * x[j])) over the n entries of x whose keep flag is set (keep NULL: all). */
static double log_sum_exp(const float *x, size_t n, double scale, const unsigned char *keep) {
    double mx = -INFINITY;
    for (size_t j = 0; j < n; j++)
        if (!keep || keep[j]) mx = fmax(mx, scale * x[j]);
    double sum = 0;
    for (size_t j = 0; j < n; j++)
        if (!keep || keep[j]) sum += exp(scale * x[j] - mx);
    return mx + log(sum);
}

/* ---------------------------------------------------------------------------------------------
 * Margin-MSE
 * ------------------------------------------------------------------------------------------- */

float kst_margin_mse_forward(const float *s, const float *t, size_t B, size_t n) {
    double sum = 0;
    for (size_t b = 0; b < B; b++) {
        const float *sb = s + b * n, *tb = t + b * n;
        for (size_t i = 1; i < n; i++) {
            double e = ((double)sb[0] - sb[i]) - ((double)tb[0] - tb[i]);
            sum += e * e;
        }
    }
    return (float)(sum / (double)(B * (n - 1)));
}

void kst_margin_mse_backward(float *ds, const float *s, const float *t, size_t B, size_t n,
                             float dloss) {
    double c = 2.0 * dloss / (double)(B * (n - 1));
    for (size_t b = 0; b < B; b++) {
        const float *sb = s + b * n, *tb = t + b * n;
        float *db = ds + b * n;
        double dpos = 0;
        for (size_t i = 1; i < n; i++) {
            double e = ((double)sb[0] - sb[i]) - ((double)tb[0] - tb[i]);
            dpos += c * e;
            db[i] += (float)(-c * e);
        }
        db[0] += (float)dpos;
    }
}

/* ---------------------------------------------------------------------------------------------
 * Listwise KL (ColBERTv2)
 * ------------------------------------------------------------------------------------------- */

float kst_kl_forward(const float *s, const float *t, size_t B, size_t n, float teacher_scale) {
    double sum = 0, a = teacher_scale;
    for (size_t b = 0; b < B; b++) {
        const float *sb = s + b * n, *tb = t + b * n;
        double lse_s = log_sum_exp(sb, n, 1.0, NULL), lse_t = log_sum_exp(tb, n, a, NULL);
        for (size_t j = 0; j < n; j++) {
            double lt = a * tb[j] - lse_t, ls = sb[j] - lse_s;
            sum += exp(lt) * (lt - ls);
        }
    }
    return (float)(sum / (double)B);
}

void kst_kl_backward(float *ds, const float *s, const float *t, size_t B, size_t n,
                     float teacher_scale, float dloss) {
    double a = teacher_scale, c = (double)dloss / (double)B;
    for (size_t b = 0; b < B; b++) {
        const float *sb = s + b * n, *tb = t + b * n;
        double lse_s = log_sum_exp(sb, n, 1.0, NULL), lse_t = log_sum_exp(tb, n, a, NULL);
        for (size_t j = 0; j < n; j++)
            ds[b * n + j] += (float)(c * (exp(sb[j] - lse_s) - exp(a * tb[j] - lse_t)));
    }
}

/* ---------------------------------------------------------------------------------------------
 * In-batch negatives cross-entropy
 * ------------------------------------------------------------------------------------------- */

/* Is column col of row b part of row b's softmax? */
static int ib_keep(size_t b, size_t col, size_t n, int exclude_own_negatives) {
    return !exclude_own_negatives || col <= b * n || col >= (b + 1) * n;
}

/* log-sum-exp of row b over its kept columns. */
static double ib_lse(const float *row, size_t b, size_t B, size_t n, int excl) {
    size_t W = B * n;
    double mx = -INFINITY, sum = 0;
    for (size_t c = 0; c < W; c++)
        if (ib_keep(b, c, n, excl)) mx = fmax(mx, row[c]);
    for (size_t c = 0; c < W; c++)
        if (ib_keep(b, c, n, excl)) sum += exp(row[c] - mx);
    return mx + log(sum);
}

float kst_inbatch_ce_forward(const float *S, size_t B, size_t n, int exclude_own_negatives,
                             float weight) {
    double sum = 0;
    for (size_t b = 0; b < B; b++) {
        const float *row = S + b * B * n;
        sum += ib_lse(row, b, B, n, exclude_own_negatives) - row[b * n];
    }
    return (float)((double)weight * sum / (double)B);
}

void kst_inbatch_ce_backward(float *dS, const float *S, size_t B, size_t n,
                             int exclude_own_negatives, float weight, float dloss) {
    double c = (double)weight * dloss / (double)B;
    size_t W = B * n;
    for (size_t b = 0; b < B; b++) {
        const float *row = S + b * W;
        float *drow = dS + b * W;
        double lse = ib_lse(row, b, B, n, exclude_own_negatives);
        for (size_t col = 0; col < W; col++) {
            if (!ib_keep(b, col, n, exclude_own_negatives)) continue;
            double g = exp(row[col] - lse) - (col == b * n ? 1.0 : 0.0);
            drow[col] += (float)(c * g);
        }
    }
}

/* ---------------------------------------------------------------------------------------------
 * MSE and BCE with logits
 * ------------------------------------------------------------------------------------------- */

float kst_mse_forward(const float *s, const float *t, size_t N) {
    double sum = 0;
    for (size_t i = 0; i < N; i++) {
        double e = (double)s[i] - t[i];
        sum += e * e;
    }
    return (float)(sum / (double)N);
}

void kst_mse_backward(float *ds, const float *s, const float *t, size_t N, float dloss) {
    double c = 2.0 * dloss / (double)N;
    for (size_t i = 0; i < N; i++) ds[i] += (float)(c * ((double)s[i] - t[i]));
}

float kst_bce_logits_forward(const float *x, const float *y, size_t N) {
    double sum = 0;
    for (size_t i = 0; i < N; i++) {
        double xi = x[i];
        sum += fmax(xi, 0.0) - xi * y[i] + log1p(exp(-fabs(xi)));
    }
    return (float)(sum / (double)N);
}

void kst_bce_logits_backward(float *dx, const float *x, const float *y, size_t N, float dloss) {
    double c = (double)dloss / (double)N;
    for (size_t i = 0; i < N; i++) {
        double xi = x[i];
        /* sigmoid without overflow for either sign */
        double sig = xi >= 0 ? 1.0 / (1.0 + exp(-xi)) : exp(xi) / (1.0 + exp(xi));
        dx[i] += (float)(c * (sig - y[i]));
    }
}
