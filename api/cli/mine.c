/* mine.c - `kestrel mine`: training triples with hard negatives from an index's first stage. */
#include <string.h>

#include "cli.h"
#include "rank/search.h"
#include "train/mine.h"

static const char *HELP =
    "usage: kestrel mine --index DIR --queries FILE --qrels FILE --out TRIPLES.tsv\n"
    "                    [--first-stage bm25|dense|bm25,dense] [--negatives N] [--skip-top K]\n"
    "                    [--relevance-level L]\n"
    "\n"
    "Searches every judged query in the index's first stage and writes, for each of its positives\n"
    "(qrels relevance >= L), its N best-ranked documents that the qrels do not mark relevant:\n"
    "  qid<TAB>pos_pid<TAB>neg_pid       (one triple per line, no header)\n"
    "the id-triples form MS MARCO's training triples use. `kestrel teach` scores such a file with a\n"
    "cross-encoder into a Hofstaetter teacher file for `kestrel train margin-mse`.\n"
    "\n"
    "  --index DIR          an index folder (kestrel index build)\n"
    "  --queries FILE       qid<TAB>text or BEIR queries.jsonl\n"
    "  --qrels FILE         TREC (qid 0 docid rel) or BEIR TSV qrels\n"
    "  --out FILE           the triples, written atomically\n"
    "  --first-stage S      bm25, dense, or bm25,dense (fused by reciprocal rank fusion)\n"
    "                       (default: dense when the index has a dense model, else bm25)\n"
    "  --negatives N        negatives per (query, positive) (default 8)\n"
    "  --skip-top K         never take the top K hits as negatives (default 0): they are often\n"
    "                       relevant documents the qrels missed\n"
    "  --relevance-level L  judgments >= L are positives (default 1)\n"
    "Queries of the qrels without a positive, or absent from --queries, are skipped and counted.\n";

int cmd_mine(int argc, char **argv) {
    const char *index = NULL, *queries = NULL, *qrels = NULL, *out = NULL;
    kst_mine_opts o = kst_mine_opts_default();
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        size_t n;
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            fputs(HELP, stdout);
            return 0;
        }
        if (!v) return cli_usage_error("mine", "%s needs a value (or is unknown)", a);
        i++;
        if (strcmp(a, "--index") == 0) index = v;
        else if (strcmp(a, "--queries") == 0) queries = v;
        else if (strcmp(a, "--qrels") == 0) qrels = v;
        else if (strcmp(a, "--out") == 0) out = v;
        else if (strcmp(a, "--first-stage") == 0) {
            kst_error err;
            if (kst_search_stages_parse(v, &o.stages, &err) != KST_OK || (o.stages & ~(unsigned)(KST_STAGE_BM25 | KST_STAGE_DENSE)))
                return cli_usage_error("mine", "--first-stage expects bm25, dense or bm25,dense, got \"%s\"", v);
        } else if (strcmp(a, "--negatives") == 0 || strcmp(a, "--skip-top") == 0 || strcmp(a, "--relevance-level") == 0) {
            if (cli_size_value(a, v, &n) != 0) return KST_EXIT_USAGE;
            if (a[2] == 'n') {
                if (!n) return cli_usage_error("mine", "--negatives must be at least 1");
                o.negatives = n;
            } else if (a[2] == 's') o.skip_top = n;
            else o.relevance_level = (int)n;
        } else {
            return cli_usage_error("mine", "unknown option \"%s\"", a);
        }
    }
    if (argc < 2) {
        fputs(HELP, stderr);
        return KST_EXIT_USAGE;
    }
    if (!index || !queries || !qrels || !out)
        return cli_usage_error("mine", "--index, --queries, --qrels and --out are required");
    kst_mine_stats st;
    kst_error err;
    int rc = kst_mine(index, queries, qrels, out, &o, &st, &err);
    if (rc != KST_OK) return cli_report("mine", rc, &err);
    fprintf(stderr, "kestrel mine: %zu triples from %zu queries into %s", st.triples, st.queries, out);
    if (st.no_positive || st.no_text || st.short_lists)
        fprintf(stderr, " (skipped: %zu without a positive, %zu without text; %zu positives got fewer than %zu negatives)",
                st.no_positive, st.no_text, st.short_lists, o.negatives);
    fputc('\n', stderr);
    return 0;
}
