/* score.c - `kestrel score`: one score per query<TAB>passage line, for any model role. */
#include <stdlib.h>
#include <string.h>

#include "cli.h"

static const char *HELP =
    "usage: kestrel score --model DIR --pairs FILE [--max-len N] [--batch-size N] [--kind K]\n"
    "\n"
    "FILE holds query<TAB>passage lines (the passage is everything after the first tab). Prints\n"
    "one line per pair:\n"
    "  dense model:   the model's similarity of the query and passage vectors (cosine, or dot\n"
    "                 when config_sentence_transformers.json says so)\n"
    "  ColBERT model: MaxSim (sum over query tokens of the best document-token dot product)\n"
    "  cross-encoder: the logit (num_labels logits, space separated, when there are several)\n"
    "\n"
    "  --model DIR      checkpoint folder\n"
    "  --pairs FILE     the pairs ('-' for stdin)\n"
    "  --max-len N      truncate to N tokens (cross: the pair; ColBERT: the passage)\n"
    "  --batch-size N   pairs per forward pass (default 32)\n"
    "  --threads N      CPU threads (default: all cores)\n"
    "  --device D       cpu (default) or cuda: the transformer on the GPU (bf16; needs a build\n"
    "                   with make CUDA=1 and an NVIDIA GPU); tokenization stays on the CPU\n"
    "  --kind K         dense, colbert or cross (default: detected from the folder)\n";

int cmd_score(int argc, char **argv) {
    cli_model_args a = {0};
    const char *pairs = NULL;
    for (int i = 1; i < argc; i++) {
        int r = cli_model_option(&a, argc, argv, &i);
        if (r < 0) return KST_EXIT_USAGE;
        if (r > 0) continue;
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            fputs(HELP, stdout);
            return 0;
        } else if (strcmp(argv[i], "--pairs") == 0 && i + 1 < argc) {
            pairs = argv[++i];
        } else {
            return cli_usage_error("score", "unknown option \"%s\"", argv[i]);
        }
    }
    if (!a.model) return cli_usage_error("score", "--model DIR is required");
    if (!pairs) return cli_usage_error("score", "--pairs FILE is required");
    FILE *fp = strcmp(pairs, "-") == 0 ? stdin : fopen(pairs, "rb");
    if (!fp) {
        perror(pairs);
        return -KST_ERR_IO;
    }
    int code = 0;
    kst_model *m = cli_open_model(&a, &code);
    if (!m) {
        if (fp != stdin) fclose(fp);
        return code;
    }
    kst_encode_opts o = kst_encode_opts_default();
    o.max_len = a.max_len;
    if (a.batch_size) o.batch_size = a.batch_size;
    size_t ns = kst_model_num_scores(m);
    cli_lines lines = {0};
    const char **q = NULL, **p = NULL;
    size_t *ql = NULL, *pl = NULL;
    float *scores = NULL;
    long got;
    while (code == 0 && (got = cli_read_lines(fp, 4096, &lines)) > 0) {
        size_t n = lines.n;
        q = realloc(q, n * sizeof *q);
        p = realloc(p, n * sizeof *p);
        ql = realloc(ql, n * sizeof *ql);
        pl = realloc(pl, n * sizeof *pl);
        scores = realloc(scores, n * ns * sizeof *scores);
        if (!q || !p || !ql || !pl || !scores) {
            code = cli_report("score", KST_ERR_NOMEM, NULL);
            break;
        }
        for (size_t i = 0; i < n; i++) {
            char *t = lines.text[i];
            char *tab = memchr(t, '\t', lines.len[i]);
            if (!tab) {
                fprintf(stderr, "kestrel score: %s line %zu: expected query<TAB>passage, found no tab\n",
                        pairs, lines.lineno - n + i + 1);
                code = -KST_ERR_FORMAT;
                break;
            }
            q[i] = t;
            ql[i] = (size_t)(tab - t);
            p[i] = tab + 1;
            pl[i] = lines.len[i] - ql[i] - 1;
        }
        if (code) break;
        kst_error err;
        int rc = kst_model_score(m, q, ql, p, pl, n, &o, scores, &err);
        if (rc != KST_OK) {
            code = cli_report("score", rc, &err);
            break;
        }
        for (size_t i = 0; i < n; i++) {
            for (size_t k = 0; k < ns; k++) printf(k ? " %.8g" : "%.8g", scores[i * ns + k]);
            putchar('\n');
        }
        cli_lines_clear(&lines);
    }
    if (code == 0 && got < 0) code = cli_report("score", KST_ERR_IO, NULL);
    cli_lines_clear(&lines);
    free(lines.text);
    free(lines.len);
    free(q);
    free(p);
    free(ql);
    free(pl);
    free(scores);
    if (fp != stdin) fclose(fp);
    kst_model_close(m);
    if (fflush(stdout) != 0 && code == 0) code = -KST_ERR_IO;
    return code < 0 ? -code : code;
}
