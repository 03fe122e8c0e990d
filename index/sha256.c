/* sha256.c - SHA-256 of files through OpenSSL EVP (libcrypto), streamed in 1 MiB reads. */
#include "sha256.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>

#include <openssl/evp.h>

#include "core/check.h"
#include "core/mem.h"

#define READ_CHUNK (1u << 20)

int kst_sha256_files(const char *const *paths, size_t n, unsigned char digest[KST_SHA256_LEN],
                     kst_error *err) {
    if (!paths && n) return kst_fail(err, KST_ERR_INVALID, "sha256: NULL path list");
    int rc = KST_OK;
    FILE *fp = NULL;
    unsigned char *buf = kst_malloc(READ_CHUNK, 1, "sha256 read buffer", err);
    EVP_MD_CTX *ctx = NULL;
    if (!buf) return KST_ERR_NOMEM;
    ctx = EVP_MD_CTX_new();
    if (!ctx || EVP_DigestInit_ex(ctx, EVP_sha256(), NULL) != 1) {
        rc = kst_fail(err, KST_ERR_INTERNAL, "sha256: OpenSSL could not start a SHA-256 digest");
        goto done;
    }
    for (size_t i = 0; i < n; i++) {
        if (!paths[i]) {
            rc = kst_fail(err, KST_ERR_INVALID, "sha256: path %zu of %zu is NULL", i + 1, n);
            goto done;
        }
        fp = fopen(paths[i], "rb");
        if (!fp) {
            rc = kst_fail(err, KST_ERR_IO, "%s: cannot open model weight file: %s", paths[i],
                          strerror(errno));
            goto done;
        }
        unsigned long long total = 0;
        size_t got;
        while ((got = fread(buf, 1, READ_CHUNK, fp)) > 0) {
            if (EVP_DigestUpdate(ctx, buf, got) != 1) {
                rc = kst_fail(err, KST_ERR_INTERNAL, "%s: OpenSSL SHA-256 update failed", paths[i]);
                goto done;
            }
            total += got;
        }
        if (ferror(fp)) {
            rc = kst_fail(err, KST_ERR_IO, "%s: read error after %llu bytes: %s", paths[i], total,
                          strerror(errno));
            goto done;
        }
        fclose(fp);
        fp = NULL;
    }
    unsigned int len = 0;
    if (EVP_DigestFinal_ex(ctx, digest, &len) != 1 || len != KST_SHA256_LEN)
        rc = kst_fail(err, KST_ERR_INTERNAL, "sha256: OpenSSL could not finish the digest");
done:
    if (fp) fclose(fp);
    EVP_MD_CTX_free(ctx);
    kst_free(buf);
    return rc;
}

void kst_sha256_hex(const unsigned char digest[KST_SHA256_LEN], char hex[2 * KST_SHA256_LEN + 1]) {
    static const char digits[] = "0123456789abcdef";
    for (size_t i = 0; i < KST_SHA256_LEN; i++) {
        hex[2 * i] = digits[digest[i] >> 4];
        hex[2 * i + 1] = digits[digest[i] & 15];
    }
    hex[2 * KST_SHA256_LEN] = '\0';
}
