/* index.c - `kestrel index build|add|delete|info`: make and change an index folder. */
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "core/progress.h"

static const char *HELP =
    "usage: kestrel index build --index DIR --collection FILE (--model DIR | --bm25-only)\n"
    "                           [--colbert DIR] [--cross DIR] [--factory STR] [--format F]\n"
    "       kestrel index add    --index DIR --collection FILE [--format F]\n"
    "       kestrel index delete --index DIR --ids FILE\n"
    "       kestrel index info   --index DIR\n"
    "\n"
    "build    creates DIR (absent or empty) and adds the collection: documents and BM25 in SQLite,\n"
    "         dense vectors in FAISS, ColBERT token vectors when --colbert is given\n"
    "add      adds documents; an id already in the index is replaced\n"
    "delete   removes the ids listed in FILE (one per line) everywhere\n"
    "info     prints what the index holds and what it was built with\n"
    "\n"
    "  --collection FILE  TSV (id<TAB>text or id<TAB>title<TAB>text), BEIR corpus.jsonl or\n"
    "                     Pyserini JSONL (id, contents); gzipped or not; '-' for stdin; or an\n"
    "                     http(s):// URL, streamed\n"
    "  --format F         auto (default), tsv, beir or pyserini\n"
    "  --model DIR        the dense bi-encoder (sentence-transformers or BERT folder)\n"
    "  --colbert DIR      a ColBERT model: token vectors are kept for MaxSim re-ranking\n"
    "  --cross DIR        a cross-encoder, recorded for re-ranking at search time\n"
    "  --factory STR      auto (default: Flat below 10,000 documents, IVF-PQ above) or a FAISS\n"
    "                     factory string: Flat, IVF1024,PQ48, OPQ48,IVF1024,PQ48, HNSW32\n"
    "  --bm25-only        no dense model: BM25 search only\n"
    "  --threads N        CPU threads (default: all cores)\n"
    "  --device D         cpu (default) or cuda: encode the documents on the GPU (make CUDA=1)\n"
    "\n"
    "Every write is one atomic commit: interrupted, the index keeps its previous content.\n";

typedef struct args {
    const char *index, *collection, *model, *colbert, *cross, *factory, *format, *ids;
    int bm25_only, threads, device;
} args;

static int parse(const char *sub, int argc, char **argv, args *a) {
    for (int i = 2; i < argc; i++) {
        const char *o = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        const char **dst = NULL;
        if (strcmp(o, "--index") == 0) dst = &a->index;
        else if (strcmp(o, "--collection") == 0) dst = &a->collection;
        else if (strcmp(o, "--model") == 0) dst = &a->model;
        else if (strcmp(o, "--colbert") == 0) dst = &a->colbert;
        else if (strcmp(o, "--cross") == 0) dst = &a->cross;
        else if (strcmp(o, "--factory") == 0) dst = &a->factory;
        else if (strcmp(o, "--format") == 0) dst = &a->format;
        else if (strcmp(o, "--ids") == 0) dst = &a->ids;
        else if (strcmp(o, "--bm25-only") == 0) {
            a->bm25_only = 1;
            continue;
        } else if (strcmp(o, "--threads") == 0) {
            size_t n;
            if (cli_size_value(o, v, &n) != 0) return KST_EXIT_USAGE;
            a->threads = (int)n;
            i++;
            continue;
        } else if (strcmp(o, "--device") == 0) {
            if (cli_device_value(v, &a->device) != 0) return KST_EXIT_USAGE;
            i++;
            continue;
        } else {
            return cli_usage_error("index", "unknown option \"%s\" for index %s", o, sub);
        }
        if (!v) return cli_usage_error("index", "%s needs a value", o);
        *dst = v;
        i++;
    }
    if (!a->index) return cli_usage_error("index", "--index DIR is required");
    return 0;
}

static void on_progress(void *ctx, size_t docs, uint64_t bytes, uint64_t total) {
    kst_progress *bar = ctx;
    if (total && !bar->total) bar->total = (size_t)total;
    kst_progress_add(bar, (size_t)bytes - bar->done);
    (void)docs;
}

static int do_add(kst_index *ix, const args *a, int *code) {
    kst_error err;
    kst_add_stats st;
    kst_progress bar;
    kst_progress_begin(&bar, "index", 0);
    int rc = kst_index_add_file(ix, a->collection, a->format, on_progress, &bar, &st, &err);
    kst_progress_end(&bar);
    if (rc != KST_OK) {
        *code = cli_report("index", rc, &err);
        return rc;
    }
    fprintf(stderr, "kestrel index: %zu documents (%zu replaced, %zu token vectors)\n", st.docs, st.replaced, st.tokens);
    fprintf(stderr, "  time: read %.2fs, store %.2fs, encode %.2fs, train %.2fs, add %.2fs, write %.2fs\n",
            st.read_s, st.store_s, st.encode_s, st.train_s, st.add_s, st.write_s);
    if (st.note[0]) fprintf(stderr, "  note: %s\n", st.note);
    return KST_OK;
}

static int info(kst_index *ix) {
    kst_index_info in;
    kst_error err;
    int rc = kst_index_info_get(ix, &in, &err);
    if (rc != KST_OK) return cli_report("index", rc, &err);
    printf("documents\t%lld\n", (long long)in.docs);
    printf("generation\t%lld\n", (long long)in.generation);
    printf("dense_dim\t%zu\n", in.dim);
    printf("faiss_factory\t%s\n", in.factory[0] ? in.factory : "-");
    printf("faiss_vectors\t%lld\n", (long long)in.vectors);
    printf("model_fingerprint\t%s\n", in.fingerprint[0] ? in.fingerprint : "- (BM25 only)");
    printf("colbert\t%s\n", in.has_colbert ? "yes" : "no");
    printf("cross_encoder\t%s\n", in.has_cross ? "yes" : "no");
    printf("query_model\t%s\n", in.query_model[0] ? in.query_model : "- (queries use the index's model)");
    return 0;
}

int cmd_index(int argc, char **argv) {
    if (argc < 2 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0) {
        fputs(HELP, argc < 2 ? stderr : stdout);
        return argc < 2 ? KST_EXIT_USAGE : 0;
    }
    const char *sub = argv[1];
    for (int i = 2; i < argc; i++)
        if (strcmp(argv[i], "--help") == 0) {
            fputs(HELP, stdout);
            return 0;
        }
    args a = {0};
    int code = parse(sub, argc, argv, &a);
    if (code) return code;
    kst_index_opts o = kst_index_opts_default();
    o.model = a.model;
    o.colbert = a.colbert;
    o.cross = a.cross;
    o.num_threads = a.threads;
    o.device = a.device;
    if (a.factory) o.factory = a.factory;
    kst_index *ix = NULL;
    kst_error err;
    int rc;
    if (strcmp(sub, "build") == 0) {
        if (!a.collection) return cli_usage_error("index", "build needs --collection FILE");
        if (!a.model && !a.bm25_only) return cli_usage_error("index", "build needs --model DIR (or --bm25-only)");
        if (a.model && a.bm25_only) return cli_usage_error("index", "--model and --bm25-only exclude each other");
        rc = kst_index_create(a.index, &o, &ix, &err);
        if (rc != KST_OK) return cli_report("index", rc, &err);
        do_add(ix, &a, &code);
    } else if (strcmp(sub, "add") == 0) {
        if (!a.collection) return cli_usage_error("index", "add needs --collection FILE");
        rc = kst_index_open(a.index, &o, &ix, &err);
        if (rc != KST_OK) return cli_report("index", rc, &err);
        do_add(ix, &a, &code);
    } else if (strcmp(sub, "delete") == 0) {
        if (!a.ids) return cli_usage_error("index", "delete needs --ids FILE");
        FILE *fp = strcmp(a.ids, "-") == 0 ? stdin : fopen(a.ids, "rb");
        if (!fp) {
            perror(a.ids);
            return -KST_ERR_IO;
        }
        cli_lines lines = {0};
        long got = cli_read_lines(fp, (size_t)-1, &lines);
        if (fp != stdin) fclose(fp);
        if (got < 0) return cli_report("index", KST_ERR_IO, NULL);
        rc = kst_index_open(a.index, &o, &ix, &err);
        size_t removed = 0;
        if (rc == KST_OK) rc = kst_index_delete(ix, (const char *const *)lines.text, lines.n, &removed, &err);
        if (rc != KST_OK) code = cli_report("index", rc, &err);
        else fprintf(stderr, "kestrel index: deleted %zu of %zu ids\n", removed, lines.n);
        cli_lines_clear(&lines);
        free(lines.text);
        free(lines.len);
    } else if (strcmp(sub, "info") == 0) {
        o.readonly = 1;
        rc = kst_index_open(a.index, &o, &ix, &err);
        if (rc != KST_OK) return cli_report("index", rc, &err);
        code = info(ix);
    } else {
        return cli_usage_error("index", "unknown subcommand \"%s\" (build, add, delete or info)", sub);
    }
    kst_index_close(ix);
    return code;
}
