/* embed.c - `kestrel embed`: lines of text from stdin into a float32 .npy file. */
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "cli.h"
#include "core/npy.h"
#include "core/progress.h"

static const char *HELP =
    "usage: kestrel embed --model DIR --out FILE.npy [--query] [--max-len N] [--batch-size N]\n"
    "                     [--kind K] [--threads N]\n"
    "\n"
    "Reads one text per line from stdin (the whole line is the text, tabs included; a trailing\n"
    "\\r\\n or \\n is dropped) and writes float32 vectors:\n"
    "  dense model:   FILE.npy of shape [n, dim], row i for line i\n"
    "  ColBERT model: FILE.npy of shape [total_tokens, dim] and FILE.offsets.npy (int64, n+1):\n"
    "                 the rows of line i are offsets[i] .. offsets[i+1]-1\n"
    "\n"
    "  --model DIR      checkpoint folder (sentence-transformers, colbert-ai or plain BERT)\n"
    "  --out FILE.npy   output file (written atomically: no partial file on failure)\n"
    "  --query          encode as queries (ColBERT query marker and [MASK] padding; the\n"
    "                   sentence-transformers \"query\" prompt when the model has one)\n"
    "  --max-len N      truncate to N tokens (default: the model's)\n"
    "  --batch-size N   texts per forward pass (default 32); texts are grouped by length\n"
    "  --threads N      CPU threads (default: all cores)\n"
    "  --device D       cpu (default) or cuda: the transformer on the GPU (bf16; needs a build\n"
    "                   with make CUDA=1 and an NVIDIA GPU); tokenization stays on the CPU\n"
    "  --kind K         dense or colbert (default: detected from the folder)\n";

/* FILE.npy -> FILE.offsets.npy */
static char *offsets_path(const char *out) {
    size_t n = strlen(out);
    char *p = malloc(n + 16);
    if (!p) return NULL;
    size_t stem = n > 4 && strcmp(out + n - 4, ".npy") == 0 ? n - 4 : n;
    memcpy(p, out, stem);
    strcpy(p + stem, ".offsets.npy");
    return p;
}

int cmd_embed(int argc, char **argv) {
    cli_model_args a = {0};
    const char *out = NULL;
    int query = 0;
    for (int i = 1; i < argc; i++) {
        int r = cli_model_option(&a, argc, argv, &i);
        if (r < 0) return KST_EXIT_USAGE;
        if (r > 0) continue;
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            fputs(HELP, stdout);
            return 0;
        } else if (strcmp(argv[i], "--query") == 0) {
            query = 1;
        } else if (strcmp(argv[i], "--out") == 0 && i + 1 < argc) {
            out = argv[++i];
        } else {
            return cli_usage_error("embed", "unknown option \"%s\"", argv[i]);
        }
    }
    if (!a.model) return cli_usage_error("embed", "--model DIR is required");
    if (!out) return cli_usage_error("embed", "--out FILE.npy is required");
    int code = 0;
    kst_model *m = cli_open_model(&a, &code);
    if (!m) return code;
    kst_model_kind kind = kst_model_kind_of(m);
    if (kind == KST_MODEL_CROSS) {
        kst_model_close(m);
        fprintf(stderr, "kestrel embed: %s is a cross-encoder; it scores pairs (use kestrel score)\n", a.model);
        return -KST_ERR_MISUSE;
    }
    kst_encode_opts o = kst_encode_opts_default();
    o.is_query = query;
    o.max_len = a.max_len;
    if (a.batch_size) o.batch_size = a.batch_size;
    size_t dim = kst_model_dim(m);
    kst_error err;
    kst_npy_writer w;
    int rc = kst_npy_writer_open(&w, out, KST_NPY_F32, dim, &err);
    if (rc != KST_OK) {
        kst_model_close(m);
        return cli_report("embed", rc, &err);
    }
    int64_t *offsets = NULL;
    size_t n_off = 0, cap_off = 0, rows = 0;
    struct stat st;
    kst_progress bar;
    kst_progress_begin(&bar, "embed", fstat(0, &st) == 0 && S_ISREG(st.st_mode) ? (size_t)st.st_size : 0);
    cli_lines lines = {0};
    long got;
    size_t seen_bytes = 0;
    float *vecs = NULL;
    while (rc == KST_OK && (got = cli_read_lines(stdin, 4096, &lines)) > 0) {
        const char *const *texts = (const char *const *)lines.text;
        if (kind == KST_MODEL_DENSE) {
            vecs = realloc(vecs, lines.n * dim * sizeof(float));
            if (!vecs) {
                rc = KST_ERR_NOMEM;
                break;
            }
            rc = kst_model_embed(m, texts, lines.len, lines.n, &o, vecs, &err);
            if (rc == KST_OK) rc = kst_npy_writer_append(&w, vecs, lines.n, &err);
        } else {
            kst_token_vectors *tv = NULL;
            rc = kst_model_embed_tokens(m, texts, lines.len, lines.n, &o, &tv, &err);
            if (rc == KST_OK) rc = kst_npy_writer_append(&w, tv->vectors, tv->total, &err);
            if (rc == KST_OK) {
                if (n_off + lines.n + 1 > cap_off) {
                    cap_off = (n_off + lines.n + 1) * 2;
                    int64_t *no = realloc(offsets, cap_off * sizeof *no);
                    if (!no) rc = KST_ERR_NOMEM;
                    else offsets = no;
                }
                for (size_t i = 0; rc == KST_OK && i < lines.n; i++) offsets[n_off++] = (int64_t)rows + tv->offsets[i];
                rows += tv->total;
            }
            kst_token_vectors_free(tv);
        }
        kst_progress_add(&bar, lines.bytes - seen_bytes);
        seen_bytes = lines.bytes;
        cli_lines_clear(&lines);
    }
    kst_progress_end(&bar);
    free(vecs);
    if (rc == KST_OK && got < 0) {
        rc = KST_ERR_IO;
        snprintf(err.msg, sizeof err.msg, "stdin: read error after line %zu", lines.lineno);
    }
    if (rc == KST_OK && kind == KST_MODEL_COLBERT) {
        if (!offsets) offsets = malloc(sizeof *offsets);
        if (!offsets) rc = KST_ERR_NOMEM;
        else {
            offsets[n_off] = (int64_t)rows;
            char *op = offsets_path(out);
            size_t shape[1] = {n_off + 1};
            rc = op ? kst_npy_write(op, KST_NPY_I64, offsets, 1, shape, &err) : KST_ERR_NOMEM;
            free(op);
        }
    }
    if (rc == KST_OK) rc = kst_npy_writer_finish(&w, &err);
    else kst_npy_writer_abort(&w);
    if (rc != KST_OK) code = cli_report("embed", rc, rc == KST_ERR_NOMEM ? NULL : &err);
    else fprintf(stderr, "kestrel embed: wrote %zu x %zu vectors to %s\n",
                 kind == KST_MODEL_DENSE ? lines.lineno : rows, dim, out);
    free(offsets);
    free(lines.text);
    free(lines.len);
    kst_model_close(m);
    return code;
}
