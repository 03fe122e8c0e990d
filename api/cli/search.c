/* search.c - `kestrel search`: one query, or a query file into a TREC run. */
#include <cjson/cJSON.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "core/progress.h"

static const char *HELP =
    "usage: kestrel search --index DIR --query TEXT [-k N] [--format text|tsv|json|trec] [--ids-only]\n"
    "       kestrel search --index DIR --queries FILE --run OUT [-k N] [--tag TAG]\n"
    "                      [--stages LIST] [--nprobe N] [--model DIR] [--colbert DIR] [--cross DIR]\n"
    "\n"
    "Runs the staged pipeline: first stage (dense ANN and/or BM25, fused by reciprocal rank\n"
    "fusion), then ColBERT MaxSim and cross-encoder re-ranking when the index has those models.\n"
    "\n"
    "  --query TEXT     one query; hits printed in --format (default text)\n"
    "  --queries FILE   qid<TAB>text lines or BEIR queries.jsonl; with --run OUT, a TREC run\n"
    "                   (qid Q0 docid rank score tag) is written atomically\n"
    "  -k N             hits per query (default 10; use 1000 for evaluation runs)\n"
    "  --stages LIST    any of dense,bm25,maxsim,cross (default: every stage the index has;\n"
    "                   dense and bm25 together are fused)\n"
    "  --candidates N   first-stage candidates per retriever (default 100)\n"
    "  --rerank N       candidates re-ranked by MaxSim (default 100)\n"
    "  --cross-k N      candidates re-ranked by the cross-encoder (default 20)\n"
    "  --nprobe N       IVF lists probed (default 16)\n"
    "  --device D       cpu (default) or cuda: encoders and dense search (Flat, IVF-PQ) on the GPU\n"
    "  --format F       text, tsv (id score stage title), json, or trec\n"
    "  --ids-only       hits without title and text (ids and scores; implied by trec and --run):\n"
    "                   a dense-only search then reads no document rows\n"
    "  --model/--colbert/--cross DIR   use these model folders instead of the recorded ones\n"
    "                   (the dense and ColBERT weights must be the ones the index was built with)\n";

static const char *stage_name(unsigned s) {
    if ((s & (KST_SEARCH_DENSE | KST_SEARCH_BM25)) == (KST_SEARCH_DENSE | KST_SEARCH_BM25)) return "rrf";
    if (s & KST_SEARCH_CROSS) return "cross";
    if (s & KST_SEARCH_MAXSIM) return "maxsim";
    if (s & KST_SEARCH_BM25) return "bm25";
    return "dense";
}

static void print_hits(const kst_hits *h, const char *fmt) {
    if (strcmp(fmt, "json") == 0) {
        cJSON *arr = cJSON_CreateArray();
        for (size_t i = 0; i < h->n; i++) {
            cJSON *o = cJSON_CreateObject();
            cJSON_AddStringToObject(o, "id", h->hit[i].id);
            cJSON_AddNumberToObject(o, "score", h->hit[i].score);
            cJSON_AddStringToObject(o, "stage", stage_name(h->hit[i].stage));
            if (h->hit[i].title) cJSON_AddStringToObject(o, "title", h->hit[i].title);
            if (h->hit[i].text) cJSON_AddStringToObject(o, "text", h->hit[i].text);
            cJSON_AddItemToArray(arr, o);
        }
        char *s = cJSON_Print(arr);
        if (s) puts(s);
        free(s);
        cJSON_Delete(arr);
        return;
    }
    for (size_t i = 0; i < h->n; i++) {
        const kst_hit *x = &h->hit[i];
        if (strcmp(fmt, "trec") == 0) {
            printf("query Q0 %s %zu %.9g kestrel\n", x->id, i + 1, x->score);
        } else if (strcmp(fmt, "tsv") == 0) {
            printf("%s\t%.9g\t%s\t%s\n", x->id, x->score, stage_name(x->stage), x->title ? x->title : "");
        } else {
            printf("%2zu. %-12s %10.4f  %-6s  %.100s%s%.*s\n", i + 1, x->id, x->score, stage_name(x->stage),
                   x->title ? x->title : "", x->title && x->text ? " | " : "", x->title ? 60 : 100,
                   x->text ? x->text : "");
        }
    }
}

static void on_progress(void *ctx, size_t docs, uint64_t bytes, uint64_t total) {
    kst_progress *bar = ctx;
    kst_progress_add(bar, docs - bar->done);
    (void)bytes;
    (void)total;
}

int cmd_search(int argc, char **argv) {
    const char *index = NULL, *query = NULL, *queries = NULL, *run = NULL, *fmt = "text", *tag = "kestrel";
    kst_index_opts io = kst_index_opts_default();
    kst_search_opts so = kst_search_opts_default();
    io.readonly = 1;
    for (int i = 1; i < argc; i++) {
        const char *o = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        size_t n;
        if (strcmp(o, "--help") == 0 || strcmp(o, "-h") == 0) {
            fputs(HELP, stdout);
            return 0;
        }
        if (strcmp(o, "--ids-only") == 0) {
            so.ids_only = 1;
            continue;
        }
        if (!v) return cli_usage_error("search", "%s needs a value (or is unknown)", o);
        i++;
        if (strcmp(o, "--index") == 0) index = v;
        else if (strcmp(o, "--query") == 0) query = v;
        else if (strcmp(o, "--queries") == 0) queries = v;
        else if (strcmp(o, "--run") == 0) run = v;
        else if (strcmp(o, "--format") == 0) fmt = v;
        else if (strcmp(o, "--tag") == 0) tag = v;
        else if (strcmp(o, "--model") == 0) io.model = v;
        else if (strcmp(o, "--colbert") == 0) io.colbert = v;
        else if (strcmp(o, "--cross") == 0) io.cross = v;
        else if (strcmp(o, "--device") == 0) {
            if (cli_device_value(v, &io.device) != 0) return KST_EXIT_USAGE;
        } else if (strcmp(o, "--stages") == 0) {
            unsigned bits = 0;
            kst_error perr;
            if (kst_search_stages_parse(v, &bits, &perr) != KST_OK) return cli_usage_error("search", "--stages: %s", perr.msg);
            so.stages = bits;
        } else if (strcmp(o, "-k") == 0 || strcmp(o, "--candidates") == 0 || strcmp(o, "--rerank") == 0 ||
                   strcmp(o, "--cross-k") == 0 || strcmp(o, "--nprobe") == 0) {
            if (cli_size_value(o, v, &n) != 0) return KST_EXIT_USAGE;
            if (n == 0) return cli_usage_error("search", "%s must be at least 1", o);
            if (o[1] == 'k') so.k = n;
            else if (o[2] == 'c' && o[3] == 'a') so.dense_n = so.bm25_n = n;
            else if (o[2] == 'r') so.maxsim_m = n;
            else if (o[2] == 'c') so.cross_k = n;
            else so.nprobe = (int)n;
        } else {
            return cli_usage_error("search", "unknown option \"%s\"", o);
        }
    }
    if (!index) return cli_usage_error("search", "--index DIR is required");
    if (!query == !queries) return cli_usage_error("search", "give either --query TEXT or --queries FILE");
    if (queries && !run) return cli_usage_error("search", "--queries needs --run OUT");
    if (strcmp(fmt, "text") && strcmp(fmt, "tsv") && strcmp(fmt, "json") && strcmp(fmt, "trec"))
        return cli_usage_error("search", "--format expects text, tsv, json or trec");
    if (strcmp(fmt, "trec") == 0) so.ids_only = 1;
    if (so.k > so.dense_n) so.dense_n = so.bm25_n = so.k;
    if (so.k > so.maxsim_m) so.maxsim_m = so.k;
    kst_index *ix = NULL;
    kst_error err;
    int rc = kst_index_open(index, &io, &ix, &err);
    if (rc != KST_OK) return cli_report("search", rc, &err);
    int code = 0;
    if (query) {
        kst_hits *h = NULL;
        rc = kst_index_search(ix, query, &so, &h, &err);
        if (rc != KST_OK) code = cli_report("search", rc, &err);
        else print_hits(h, fmt);
        kst_hits_free(h);
    } else {
        kst_progress bar;
        kst_progress_begin(&bar, "search", 0);
        rc = kst_index_search_file(ix, queries, run, tag, &so, on_progress, &bar, &err);
        kst_progress_end(&bar);
        if (rc != KST_OK) code = cli_report("search", rc, &err);
        else fprintf(stderr, "kestrel search: %zu queries, run written to %s\n", bar.done, run);
    }
    kst_index_close(ix);
    return code;
}
