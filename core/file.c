/* file.c - whole-file reads, read-only memory maps and atomic replacement. */
#define _POSIX_C_SOURCE 200809L
#include "file.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "check.h"
#include "mem.h"

int kst_mmap_open(const char *path, kst_mmap *m, kst_error *err) {
    m->data = NULL;
    m->size = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return kst_fail(err, KST_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int e = errno;
        close(fd);
        return kst_fail(err, KST_ERR_IO, "%s: cannot stat: %s", path, strerror(e));
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return kst_fail(err, KST_ERR_IO, "%s: not a regular file", path);
    }
    if (st.st_size > 0) {
        void *p = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (p == MAP_FAILED) {
            int e = errno;
            close(fd);
            return kst_fail(err, KST_ERR_IO, "%s: cannot map: %s", path, strerror(e));
        }
        m->data = p;
        m->size = (size_t)st.st_size;
    }
    close(fd);
    return KST_OK;
}

void kst_mmap_close(kst_mmap *m) {
    if (m->data) munmap((void *)m->data, m->size);
    m->data = NULL;
    m->size = 0;
}

int kst_read_file(const char *path, char **out, size_t *len, kst_error *err) {
    *out = NULL;
    kst_mmap m;
    int rc = kst_mmap_open(path, &m, err);
    if (rc != KST_OK) return rc;
    char *buf = kst_malloc(m.size + 1, 1, path, err);
    if (!buf) {
        kst_mmap_close(&m);
        return KST_ERR_NOMEM;
    }
    if (m.size) memcpy(buf, m.data, m.size);
    buf[m.size] = '\0';
    if (len) *len = m.size;
    kst_mmap_close(&m);
    *out = buf;
    return KST_OK;
}

int kst_write_file_atomic(const char *path, const void *data, size_t len, kst_error *err) {
    char tmp[4096];
    if ((size_t)snprintf(tmp, sizeof tmp, "%s.tmp.%ld", path, (long)getpid()) >= sizeof tmp)
        return kst_fail(err, KST_ERR_INVALID, "%s: path too long", path);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) return kst_fail(err, KST_ERR_IO, "%s: cannot create: %s", tmp, strerror(errno));
    const unsigned char *p = data;
    size_t left = len;
    while (left > 0) {
        ssize_t w = write(fd, p, left);
        if (w < 0) {
            if (errno == EINTR) continue;
            int e = errno;
            close(fd);
            unlink(tmp);
            return kst_fail(err, KST_ERR_IO, "%s: write failed: %s", tmp, strerror(e));
        }
        p += w;
        left -= (size_t)w;
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
    return KST_OK;
}

int kst_path_exists(const char *path) {
    struct stat st;
    return stat(path, &st) == 0;
}

int kst_path_join(char *buf, size_t cap, const char *dir, const char *name, kst_error *err) {
    int n = snprintf(buf, cap, "%s/%s", dir, name);
    if (n < 0 || (size_t)n >= cap)
        return kst_fail(err, KST_ERR_INVALID, "%s/%s: path longer than %zu bytes", dir, name, cap);
    return KST_OK;
}

int kst_mkdirs(const char *path, kst_error *err) {
    char buf[4096];
    size_t n = strlen(path);
    if (n == 0 || n >= sizeof buf) return kst_fail(err, KST_ERR_INVALID, "%s: bad folder path", path);
    memcpy(buf, path, n + 1);
    for (size_t i = 1; i <= n; i++) {
        if (buf[i] != '/' && buf[i] != '\0') continue;
        char c = buf[i];
        buf[i] = '\0';
        if (mkdir(buf, 0755) != 0 && errno != EEXIST)
            return kst_fail(err, KST_ERR_IO, "%s: cannot create: %s", buf, strerror(errno));
        buf[i] = c;
    }
    struct stat st;
    if (stat(path, &st) != 0 || !S_ISDIR(st.st_mode))
        return kst_fail(err, KST_ERR_IO, "%s: not a folder", path);
    return KST_OK;
}
