/* teach.c - `kestrel teach`: score training triples with a cross-encoder (local, or a remote
 * /rerank service) into a teacher file. */
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "train/teach.h"

static const char *HELP =
    "usage: kestrel teach (--model CROSS_DIR | --teacher-url URL) --triples FILE\n"
    "         [--queries FILE --collection FILE] --out SCORES.tsv\n"
    "         [--batch-size N] [--max-len N] [--threads N]\n"
    "         [--timeout S] [--connect-timeout S] [--retries N] [--retry-wait S]\n"
    "\n"
    "Scores (query, positive, negative) triples with a cross-encoder and writes a teacher file for\n"
    "`kestrel train margin-mse` / `train cross --teacher-scores`, in the input's order:\n"
    "  --triples with --queries/--collection: qid<TAB>pos_pid<TAB>neg_pid lines (e.g. `kestrel mine`'s);\n"
    "      writes Hofstaetter lines  pos_score<TAB>neg_score<TAB>qid<TAB>pos_pid<TAB>neg_pid\n"
    "  --triples alone: query<TAB>positive<TAB>negative text lines;\n"
    "      writes matchmaker lines   pos_score<TAB>neg_score<TAB>query<TAB>positive<TAB>negative\n"
    "Scores are raw logits. SCORES.tsv appears only when every triple was scored (written beside it,\n"
    "then renamed): a bad line, an unknown id or a failing server leaves no output.\n"
    "\n"
    "Teacher, one of:\n"
    "  --model DIR        a cross-encoder folder (BertForSequenceClassification / DistilBERT, 1 logit)\n"
    "  --teacher-url URL  a reranking service speaking text-embeddings-inference's /rerank API\n"
    "                     (POST {\"query\", \"texts\", \"raw_scores\": true, \"truncate\": true} ->\n"
    "                     [{\"index\", \"score\"}, ...]); \"/rerank\" is appended unless the URL ends\n"
    "                     with it. `kestrel serve-rerank` is one such service.\n"
    "\n"
    "  --batch-size N       pairs per forward pass; remote: texts per request (32). Remote requests\n"
    "                       carry the passages of one query (triples are grouped by query per 2048)\n"
    "  --max-len N          local: tokens per pair (default the model's)\n"
    "  --threads N          local: CPU threads (default all cores)\n"
    "  --timeout S          remote: seconds per request before it counts as failed (120)\n"
    "  --connect-timeout S  remote: seconds to connect (10)\n"
    "  --retries N          remote: retries of a request on a connection error, a time-out or an\n"
    "                       HTTP 5xx/429 answer (5); other statuses and malformed answers fail at once\n"
    "  --retry-wait S       remote: first back-off in seconds, doubled per retry up to 30 (0.5)\n";

int cmd_teach(int argc, char **argv) {
    const char *cmd = "teach";
    kst_teach_opts o = kst_teach_opts_default();
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            fputs(HELP, stdout);
            return 0;
        }
        if (!v) return cli_usage_error(cmd, "%s needs a value (or is unknown)", a);
        i++;
        size_t n;
        char *end = NULL;
        if (strcmp(a, "--model") == 0) o.model_dir = v;
        else if (strcmp(a, "--teacher-url") == 0) o.teacher_url = v;
        else if (strcmp(a, "--triples") == 0) o.triples_path = v;
        else if (strcmp(a, "--queries") == 0) o.queries_path = v;
        else if (strcmp(a, "--collection") == 0) o.collection_path = v;
        else if (strcmp(a, "--out") == 0) o.out_path = v;
        else if (strcmp(a, "--batch-size") == 0 || strcmp(a, "--max-len") == 0 || strcmp(a, "--threads") == 0 ||
                 strcmp(a, "--retries") == 0) {
            if (cli_size_value(a, v, &n) != 0) return KST_EXIT_USAGE;
            if (a[2] == 'b') {
                if (n < 2) return cli_usage_error(cmd, "--batch-size must be at least 2 (a positive and a negative)");
                o.batch_size = n;
            } else if (a[2] == 'm') o.max_len = n;
            else if (a[2] == 't') o.num_threads = (int)n;
            else o.retries = (int)(n > 100 ? 100 : n);
        } else if (strcmp(a, "--timeout") == 0 || strcmp(a, "--connect-timeout") == 0 ||
                   strcmp(a, "--retry-wait") == 0) {
            double x = strtod(v, &end);
            if (!*v || *end || !(x >= 0) || x > 86400)
                return cli_usage_error(cmd, "%s expects seconds (a number >= 0), got \"%s\"", a, v);
            if (a[2] == 't') o.timeout_s = x;
            else if (a[2] == 'c') o.connect_timeout_s = x;
            else o.retry_wait_s = x;
        } else {
            return cli_usage_error(cmd, "unknown option \"%s\"", a);
        }
    }
    if (!o.triples_path || !o.out_path) return cli_usage_error(cmd, "--triples and --out are required");
    if (!!o.model_dir == !!o.teacher_url) return cli_usage_error(cmd, "give one of --model and --teacher-url");
    if (!!o.queries_path != !!o.collection_path)
        return cli_usage_error(cmd, "--queries and --collection go together (id triples)");
    o.quiet = getenv("KESTREL_NO_PROGRESS") != NULL;
    kst_teach_result r;
    kst_error err;
    int rc = kst_teach(&o, &r, &err);
    if (rc != KST_OK) {
        int code = cli_report(cmd, rc, &err);
        fprintf(stderr, "kestrel teach: nothing was written to %s\n", o.out_path);
        return code;
    }
    if (o.teacher_url)
        fprintf(stderr, "kestrel teach: %zu triples in %.2fs (%.3f triples/s), %zu requests, %zu retries; wrote %s\n",
                r.triples, r.seconds, r.seconds > 0 ? (double)r.triples / r.seconds : 0.0, r.requests, r.retries,
                o.out_path);
    else
        fprintf(stderr, "kestrel teach: %zu triples in %.2fs (%.3f triples/s); wrote %s\n", r.triples, r.seconds,
                r.seconds > 0 ? (double)r.triples / r.seconds : 0.0, o.out_path);
    return 0;
}
