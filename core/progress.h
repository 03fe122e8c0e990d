/* progress.h - a one-line progress bar on stderr with rate and ETA (silent when not a terminal). */
#ifndef KST_CORE_PROGRESS_H
#define KST_CORE_PROGRESS_H

#include <stddef.h>

typedef struct kst_progress {
    const char *label;
    size_t total;     /* 0 when unknown */
    size_t done;
    double start;     /* seconds, monotonic */
    double last_draw;
    int enabled;
    char suffix[96]; /* printed after the ETA (e.g. "loss 0.1234 lr 2.0e-05"); "" by default */
} kst_progress;

/* Starts a bar; enabled only when stderr is a terminal and KESTREL_NO_PROGRESS is unset. */
void kst_progress_begin(kst_progress *p, const char *label, size_t total);
/* Adds n units and redraws at most ten times a second. */
void kst_progress_add(kst_progress *p, size_t n);
/* Draws the final state and ends the line. */
void kst_progress_end(kst_progress *p);

/* Monotonic clock in seconds (used by the bar and the benchmarks). */
double kst_now(void);

#endif
