/* tokenize.c - `kestrel tokenize`: the token ids a model feeds its transformer, one line each. */
#include <stdlib.h>
#include <string.h>

#include "cli.h"

static const char *HELP =
    "usage: kestrel tokenize --model DIR [--max-len N] [--pair] [--query] [--kind K]\n"
    "\n"
    "Reads text from stdin, one input per line, and prints one line per input: the token ids,\n"
    "space separated, special tokens included, exactly as the model's encoder feeds them.\n"
    "\n"
    "  --model DIR    checkpoint folder (vocab.txt or tokenizer.json, tokenizer_config.json)\n"
    "  --max-len N    truncate to N tokens (default: the model's max length)\n"
    "  --pair         each line is query<TAB>passage: [CLS] q [SEP] p [SEP], longest_first\n"
    "  --query        ColBERT: tokenize as a query (marker [unused0], [MASK] padding)\n"
    "  --kind K       dense, colbert or cross (default: detected from the folder)\n";

int cmd_tokenize(int argc, char **argv) {
    cli_model_args a = {0};
    int pair = 0, query = 0;
    for (int i = 1; i < argc; i++) {
        int r = cli_model_option(&a, argc, argv, &i);
        if (r < 0) return KST_EXIT_USAGE;
        if (r > 0) continue;
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            fputs(HELP, stdout);
            return 0;
        } else if (strcmp(argv[i], "--pair") == 0) {
            pair = 1;
        } else if (strcmp(argv[i], "--query") == 0) {
            query = 1;
        } else {
            return cli_usage_error("tokenize", "unknown option \"%s\"", argv[i]);
        }
    }
    if (!a.model) return cli_usage_error("tokenize", "--model DIR is required");
    int code = 0;
    kst_model *m = cli_open_model(&a, &code);
    if (!m) return code;
    kst_encode_opts o = kst_encode_opts_default();
    o.max_len = a.max_len;
    o.is_query = query;
    cli_lines lines = {0};
    long got;
    while (code == 0 && (got = cli_read_lines(stdin, 4096, &lines)) > 0) {
        for (size_t i = 0; i < lines.n && code == 0; i++) {
            const char *text = lines.text[i], *psg = NULL;
            size_t tlen = lines.len[i], plen = 0;
            if (pair) {
                const char *tab = memchr(text, '\t', tlen);
                if (!tab) {
                    fprintf(stderr, "kestrel tokenize: stdin line %zu: expected query<TAB>passage\n",
                            lines.lineno - lines.n + i + 1);
                    code = -KST_ERR_FORMAT;
                    break;
                }
                psg = tab + 1;
                plen = tlen - (size_t)(psg - text);
                tlen = (size_t)(tab - text);
            }
            int32_t *ids = NULL;
            size_t n = 0;
            kst_error err;
            int rc = kst_model_tokenize(m, text, tlen, psg, plen, &o, &ids, NULL, &n, &err);
            if (rc != KST_OK) {
                code = cli_report("tokenize", rc, &err);
                break;
            }
            for (size_t k = 0; k < n; k++) printf(k ? " %d" : "%d", ids[k]);
            putchar('\n');
            kst_ids_array_free(ids);
        }
        cli_lines_clear(&lines);
    }
    if (code == 0 && got < 0) code = cli_report("tokenize", KST_ERR_IO, NULL);
    cli_lines_clear(&lines);
    free(lines.text);
    free(lines.len);
    kst_model_close(m);
    if (fflush(stdout) != 0 && code == 0) code = -KST_ERR_IO;
    return code < 0 ? -code : code;
}
