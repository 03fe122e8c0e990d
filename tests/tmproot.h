/* tmproot.h - one temporary folder per test group: made under $TMPDIR (or /tmp) by a cmocka group
 * setup, removed with everything in it by the teardown. Include after harness.h, in a file that
 * defines _GNU_SOURCE (or _XOPEN_SOURCE >= 500) first, for nftw. */
#ifndef KST_TESTS_TMPROOT_H
#define KST_TESTS_TMPROOT_H

#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>

static char g_root[256];

static int tmproot_rm_entry(const char *p, const struct stat *sb, int flag, struct FTW *f) {
    (void)sb, (void)flag, (void)f;
    return remove(p);
}

/* Makes g_root as $TMPDIR/<prefix>_XXXXXX; 0 on success (a cmocka group setup result). */
static int tmproot_make(const char *prefix) {
    const char *t = getenv("TMPDIR");
    snprintf(g_root, sizeof g_root, "%s/%s_XXXXXX", t && *t ? t : "/tmp", prefix);
    return mkdtemp(g_root) ? 0 : -1;
}

/* Removes g_root and everything below it. */
static int tmproot_remove(void) { return nftw(g_root, tmproot_rm_entry, 16, FTW_DEPTH | FTW_PHYS); }

#endif
