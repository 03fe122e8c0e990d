/* train_cross.c - `kestrel train cross` (cross-encoder training) and `kestrel train self-distill`
 * (the bi <-> cross-encoder loop). */
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "train/cross.h"

int cmd_train_cross(int argc, char **argv);

static const char *CROSS_HELP =
    "usage: kestrel train cross --model CROSS_DIR --out OUT_DIR\n"
    "         (--pairs FILE | --teacher-scores FILE [--queries F --collection F] [--loss margin-mse|mse]\n"
    "          | --triples FILE)\n"
    "         [--max-len N] [--batch-size N] [--steps N | --epochs N] [--lr X] [--optimizer adamw|sgd]\n"
    "         [--weight-decay X] [--warmup N] [--schedule linear|cosine] [--grad-clip X] [--dropout P]\n"
    "         [--seed N] [--no-shuffle] [--format hofstaetter|matchmaker|nway]\n"
    "\n"
    "Trains a cross-encoder (BertForSequenceClassification or DistilBertForSequenceClassification\n"
    "with one logit) on (query, passage) pairs, and writes OUT_DIR in the transformers layout\n"
    "(float32 safetensors, tokenizer files copied) with OUT_DIR/train_log.jsonl. Data, one of:\n"
    "  --pairs FILE           query<TAB>passage<TAB>label, label in [0, 1];\n"
    "                         loss = mean binary cross-entropy with logits\n"
    "  --teacher-scores FILE  a teacher file (hofstaetter with --queries/--collection, matchmaker,\n"
    "                         nway); loss = Margin-MSE on the logits of the positive and the negatives,\n"
    "                         or with --loss mse the MSE between each logit and its teacher score\n"
    "  --triples FILE         query<TAB>positive<TAB>negative; loss = cross-entropy over the\n"
    "                         (positive, negative) logits, the positive as the label\n"
    "\n"
    "  --max-len N              tokens per pair ([CLS] query [SEP] passage [SEP]; default the model's)\n"
    "  --steps N / --epochs N   optimizer steps, or passes over the data (default 1 epoch)\n"
    "  --lr X                   peak learning rate (2e-5); linear warm-up over --warmup steps, then\n"
    "                           linear (or --schedule cosine) decay to 0\n"
    "  --optimizer adamw|sgd    AdamW (no decay on biases and LayerNorm) or plain SGD\n"
    "  --grad-clip X            global-norm clipping (off)\n"
    "  --dropout P              dropout everywhere (default: the checkpoint's, classifier_dropout\n"
    "                           / seq_classif_dropout for the head)\n"
    "  --no-shuffle             file order: the first batch is the first --batch-size lines\n";

/* Parses one of the options `train margin-mse` shares; 1 consumed, 0 not ours, -1 bad value. */
static int common_option(kst_train_opts *o, const char *cmd, const char *a, const char *v) {
    size_t n;
    char *end = NULL;
    if (strcmp(a, "--model") == 0) o->model_dir = v;
    else if (strcmp(a, "--out") == 0) o->out_dir = v;
    else if (strcmp(a, "--optimizer") == 0) {
        if (strcmp(v, "adamw") == 0) o->sgd = 0;
        else if (strcmp(v, "sgd") == 0) o->sgd = 1;
        else return cli_usage_error(cmd, "--optimizer expects adamw or sgd"), -1;
    } else if (strcmp(a, "--schedule") == 0) {
        if (strcmp(v, "linear") == 0) o->cosine = 0;
        else if (strcmp(v, "cosine") == 0) o->cosine = 1;
        else return cli_usage_error(cmd, "--schedule expects linear or cosine"), -1;
    } else if (strcmp(a, "--lr") == 0 || strcmp(a, "--weight-decay") == 0 || strcmp(a, "--grad-clip") == 0 ||
               strcmp(a, "--dropout") == 0) {
        double x = strtod(v, &end);
        if (!*v || *end || x < 0) return cli_usage_error(cmd, "%s expects a non-negative number, got \"%s\"", a, v), -1;
        if (a[2] == 'l') o->lr = x;
        else if (a[2] == 'w') o->weight_decay = x;
        else if (a[2] == 'g') o->grad_clip = x;
        else {
            if (x >= 1) return cli_usage_error(cmd, "--dropout must be below 1"), -1;
            o->dropout = x;
        }
    } else if (strcmp(a, "--batch-size") == 0 || strcmp(a, "--steps") == 0 || strcmp(a, "--epochs") == 0 ||
               strcmp(a, "--warmup") == 0 || strcmp(a, "--seed") == 0) {
        if (cli_size_value(a, v, &n) != 0) return -1;
        if (!strcmp(a, "--batch-size")) {
            if (!n) return cli_usage_error(cmd, "--batch-size must be at least 1"), -1;
            o->batch_size = n;
        } else if (!strcmp(a, "--steps")) o->steps = (long)n;
        else if (!strcmp(a, "--epochs")) o->epochs = (long)n;
        else if (!strcmp(a, "--warmup")) o->warmup = (long)n;
        else o->seed = n;
    } else {
        return 0;
    }
    return 1;
}

int cmd_train_cross(int argc, char **argv) {
    const char *cmd = "train cross";
    kst_cross_opts o = kst_cross_opts_default();
    int ndata = 0;
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            fputs(CROSS_HELP, stdout);
            return 0;
        }
        if (strcmp(a, "--no-shuffle") == 0) {
            o.train.no_shuffle = 1;
            continue;
        }
        if (!v) return cli_usage_error(cmd, "%s needs a value (or is unknown)", a);
        i++;
        int c = common_option(&o.train, cmd, a, v);
        if (c < 0) return KST_EXIT_USAGE;
        if (c) continue;
        if (strcmp(a, "--pairs") == 0 || strcmp(a, "--teacher-scores") == 0 || strcmp(a, "--triples") == 0) {
            o.train.teacher_path = v;
            o.data = a[3] == 'a' ? KST_CROSS_PAIRS : a[3] == 'e' ? KST_CROSS_TEACHER : KST_CROSS_TRIPLES;
            ndata++;
        } else if (strcmp(a, "--queries") == 0) o.train.queries_path = v;
        else if (strcmp(a, "--collection") == 0) o.train.collection_path = v;
        else if (strcmp(a, "--format") == 0) {
            kst_error err;
            if (kst_teacher_format_parse(v, &o.train.format, &err) != KST_OK) return cli_usage_error(cmd, "%s", err.msg);
        } else if (strcmp(a, "--loss") == 0) {
            if (strcmp(v, "mse") == 0) o.loss_mse = 1;
            else if (strcmp(v, "margin-mse") == 0) o.loss_mse = 0;
            else return cli_usage_error(cmd, "--loss expects margin-mse or mse");
        } else if (strcmp(a, "--max-len") == 0) {
            if (cli_size_value(a, v, &o.max_len) != 0) return KST_EXIT_USAGE;
        } else {
            return cli_usage_error(cmd, "unknown option \"%s\"", a);
        }
    }
    if (!o.train.model_dir || !o.train.out_dir)
        return cli_usage_error(cmd, "--model and --out are required");
    if (ndata != 1) return cli_usage_error(cmd, "give exactly one of --pairs, --teacher-scores, --triples");
    if (o.loss_mse && o.data != KST_CROSS_TEACHER) return cli_usage_error(cmd, "--loss applies to --teacher-scores");
    kst_train_result r;
    kst_error err;
    int rc = kst_train_cross(&o, &r, &err);
    if (rc != KST_OK) return cli_report(cmd, rc, &err);
    fprintf(stderr, "kestrel train cross: %ld steps in %.1fs (%.1f pairs/s); loss %.4f -> %.4f; saved %s\n", r.steps,
            r.seconds, r.triples_per_s, r.first_loss, r.last_loss, o.train.out_dir);
    return 0;
}
