/* progress.c - a one-line progress bar on stderr with rate and ETA. */
#define _POSIX_C_SOURCE 200809L
#include "progress.h"

#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

double kst_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void draw(kst_progress *p, int final) {
    double el = kst_now() - p->start;
    double rate = el > 0 ? (double)p->done / el : 0.0;
    if (p->total) {
        int width = 30;
        int fill = (int)((double)width * (double)p->done / (double)p->total);
        if (fill > width) fill = width;
        double eta = rate > 0 ? (double)(p->total - (p->done < p->total ? p->done : p->total)) / rate
                              : 0.0;
        fprintf(stderr, "\r%s [%.*s%*s] %zu/%zu %.1f/s ETA %.0fs %s ", p->label, fill,
                "##############################", width - fill, "", p->done, p->total, rate, eta,
                p->suffix);
    } else {
        fprintf(stderr, "\r%s %zu %.1f/s ", p->label, p->done, rate);
    }
    if (final) fputc('\n', stderr);
    fflush(stderr);
}

void kst_progress_begin(kst_progress *p, const char *label, size_t total) {
    p->label = label;
    p->total = total;
    p->done = 0;
    p->start = kst_now();
    p->last_draw = 0;
    p->suffix[0] = '\0';
    p->enabled = isatty(STDERR_FILENO) && !getenv("KESTREL_NO_PROGRESS");
}

void kst_progress_add(kst_progress *p, size_t n) {
    p->done += n;
    if (!p->enabled) return;
    double t = kst_now();
    if (t - p->last_draw < 0.1) return;
    p->last_draw = t;
    draw(p, 0);
}

void kst_progress_end(kst_progress *p) {
    if (p->enabled) draw(p, 1);
}
