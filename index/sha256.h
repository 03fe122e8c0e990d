/* sha256.h - SHA-256 of files, streamed through OpenSSL's EVP interface (model fingerprints). */
#ifndef KST_INDEX_SHA256_H
#define KST_INDEX_SHA256_H

#include <stddef.h>

#include "core/error.h"

#define KST_SHA256_LEN 32

/* Hashes the bytes of the n files one after another, as if concatenated, reading 1 MiB at a time
 * (a multi-GB weight file is never held in memory). Fails with KST_ERR_IO naming the file that
 * could not be opened or read (a folder is a read error), KST_ERR_NOMEM for the read buffer,
 * KST_ERR_INTERNAL when OpenSSL fails. digest is written only on success. */
int kst_sha256_files(const char *const *paths, size_t n, unsigned char digest[KST_SHA256_LEN],
                     kst_error *err);

/* Writes the digest as 64 lowercase hex digits and a NUL. Cannot fail. */
void kst_sha256_hex(const unsigned char digest[KST_SHA256_LEN], char hex[2 * KST_SHA256_LEN + 1]);

#endif
