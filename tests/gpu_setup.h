/* gpu_setup.h - the GPU suites' common start: whether a usable GPU is here, and why not.
 * Tests that need one skip with that reason (harness.h's skip_because). */
#ifndef KST_TESTS_GPU_SETUP_H
#define KST_TESTS_GPU_SETUP_H

#include <stdio.h>

#include "core/error.h"
#include "core/gpu.h"

static int g_have_gpu;
static char g_why[KST_ERROR_MSG_MAX];

/* Fills g_have_gpu / g_why and names the device when there is one. */
static void gpu_setup(void) {
    kst_error err;
    g_have_gpu = kst_gpu_check(&err) == KST_OK;
    if (!g_have_gpu) snprintf(g_why, sizeof g_why, "%s", err.msg);
    else printf("GPU: %s\n", kst_gpu_describe());
}

#endif
