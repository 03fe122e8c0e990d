/* state.c - the resumable training state file (format in state.h). */
#define _POSIX_C_SOURCE 200809L
#include "state.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/check.h"
#include "core/mem.h"

#define STATE_MAGIC "KSTTRAIN"
#define STATE_VERSION 1u
#define STATE_ALIGN 64
#define STATE_FIXED 32 /* magic 8 + version 4 + nb 4 + n 8 + json length 8 */

static void put_u32(unsigned char *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (8 * i));
}
static void put_u64(unsigned char *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i));
}
static uint32_t get_u32(const unsigned char *p) {
    uint32_t v = 0;
    for (int i = 0; i < 4; i++) v |= (uint32_t)p[i] << (8 * i);
    return v;
}
static uint64_t get_u64(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) v |= (uint64_t)p[i] << (8 * i);
    return v;
}

static size_t padded(size_t jlen) {
    size_t h = STATE_FIXED + jlen;
    return (h + STATE_ALIGN - 1) / STATE_ALIGN * STATE_ALIGN;
}

static int write_all(int fd, const void *data, size_t len) {
    const unsigned char *p = data;
    while (len > 0) {
        ssize_t w = write(fd, p, len);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        p += w;
        len -= (size_t)w;
    }
    return 0;
}

/* The folder of `path`, fsynced so the rename itself survives a power loss. */
static void sync_parent(const char *path) {
    char dir[4096];
    snprintf(dir, sizeof dir, "%s", path);
    char *slash = strrchr(dir, '/');
    if (slash) {
        if (slash == dir) slash[1] = '\0';
        else *slash = '\0';
    } else {
        snprintf(dir, sizeof dir, ".");
    }
    int fd = open(dir, O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        fsync(fd);
        close(fd);
    }
}

/* Crash-test hook (as SQLite's test hooks): KESTREL_TEST_KILL=mid_state_save[:N] is true during
 * the Nth state write of this process (default the first). */
static int test_kill_now(void) {
    static int writes;
    const char *k = getenv("KESTREL_TEST_KILL");
    writes++;
    if (!k || strncmp(k, "mid_state_save", 14) != 0) return 0;
    int at = k[14] == ':' ? atoi(k + 15) : 1;
    return writes == at;
}

int kst_train_state_write(const char *path, const char *json, const float *const *blocks,
                          size_t nb, size_t n, kst_error *err) {
    char tmp[4096];
    if ((size_t)snprintf(tmp, sizeof tmp, "%s.tmp", path) >= sizeof tmp)
        return kst_fail(err, KST_ERR_INVALID, "%s: path too long", path);
    size_t jlen = strlen(json), hlen = padded(jlen);
    unsigned char *head = kst_calloc(hlen, 1, "training state header", err);
    if (!head) return KST_ERR_NOMEM;
    memcpy(head, STATE_MAGIC, 8);
    put_u32(head + 8, STATE_VERSION);
    put_u32(head + 12, (uint32_t)nb);
    put_u64(head + 16, (uint64_t)n);
    put_u64(head + 24, (uint64_t)jlen);
    memcpy(head + STATE_FIXED, json, jlen);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
        int e = errno;
        kst_free(head);
        return kst_fail(err, KST_ERR_IO, "%s: cannot create: %s", tmp, strerror(e));
    }
    int bad = write_all(fd, head, hlen);
    kst_free(head);
    int kill = test_kill_now();
    for (size_t b = 0; b < nb && !bad; b++) {
        bad = write_all(fd, blocks[b], n * sizeof(float));
        if (!bad && b == 0 && kill) raise(SIGKILL);
    }
    if (bad) {
        int e = errno;
        close(fd);
        unlink(tmp);
        return kst_fail(err, KST_ERR_IO, "%s: write failed: %s", tmp, strerror(e));
    }
    if (fsync(fd) != 0 || close(fd) != 0) {
        int e = errno;
        unlink(tmp);
        return kst_fail(err, KST_ERR_IO, "%s: cannot flush: %s", tmp, strerror(e));
    }
    if (rename(tmp, path) != 0) {
        int e = errno;
        unlink(tmp);
        return kst_fail(err, KST_ERR_IO, "%s: cannot replace: %s", path, strerror(e));
    }
    sync_parent(path);
    return KST_OK;
}

static int read_all(FILE *f, void *data, size_t len) {
    return fread(data, 1, len, f) == len ? 0 : -1;
}

int kst_train_state_read(const char *path, char **json, float *const *blocks, size_t nb,
                         size_t n, kst_error *err) {
    int rc = KST_OK;
    *json = NULL;
    char *js = NULL;
    FILE *f = fopen(path, "rb");
    if (!f) {
        int e = errno;
        return kst_fail(err, e == ENOENT ? KST_ERR_NOTFOUND : KST_ERR_IO, "%s: cannot open: %s", path,
                        strerror(e));
    }
    struct stat st;
    unsigned char fixed[STATE_FIXED];
    if (fstat(fileno(f), &st) != 0 || read_all(f, fixed, sizeof fixed) != 0) {
        rc = kst_fail(err, KST_ERR_FORMAT, "%s: too short for a training state", path);
        goto done;
    }
    if (memcmp(fixed, STATE_MAGIC, 8) != 0) {
        rc = kst_fail(err, KST_ERR_FORMAT, "%s: not a Kestrel training state (bad magic)", path);
        goto done;
    }
    uint32_t version = get_u32(fixed + 8), fnb = get_u32(fixed + 12);
    uint64_t fn = get_u64(fixed + 16), jlen = get_u64(fixed + 24);
    if (version != STATE_VERSION) {
        rc = kst_fail(err, KST_ERR_UNSUPPORTED, "%s: training state version %u (this build reads %u)", path,
                      (unsigned)version, STATE_VERSION);
        goto done;
    }
    if (fnb != nb || fn != n) {
        rc = kst_fail(err, KST_ERR_FORMAT,
                      "%s: holds %u blocks of %llu parameters, the model needs %zu of %zu (a state of another model?)",
                      path, (unsigned)fnb, (unsigned long long)fn, nb, n);
        goto done;
    }
    if (jlen > (uint64_t)st.st_size) {
        rc = kst_fail(err, KST_ERR_FORMAT, "%s: header length %llu beyond the file's %lld bytes", path,
                      (unsigned long long)jlen, (long long)st.st_size);
        goto done;
    }
    size_t hlen = padded((size_t)jlen);
    uint64_t want = (uint64_t)hlen + (uint64_t)nb * n * sizeof(float);
    if ((uint64_t)st.st_size != want) {
        rc = kst_fail(err, KST_ERR_FORMAT, "%s: %lld bytes, the header promises %llu (truncated?)", path,
                      (long long)st.st_size, (unsigned long long)want);
        goto done;
    }
    js = kst_malloc(hlen - STATE_FIXED + 1, 1, "training state header", err);
    if (!js) {
        rc = KST_ERR_NOMEM;
        goto done;
    }
    if (read_all(f, js, hlen - STATE_FIXED) != 0) {
        rc = kst_fail(err, KST_ERR_IO, "%s: read failed", path);
        goto done;
    }
    js[jlen] = '\0';
    for (size_t b = 0; b < nb; b++)
        if (read_all(f, blocks[b], n * sizeof(float)) != 0) {
            rc = kst_fail(err, KST_ERR_IO, "%s: read failed", path);
            goto done;
        }
    *json = js;
    js = NULL;
done:
    kst_free(js);
    fclose(f);
    return rc;
}
