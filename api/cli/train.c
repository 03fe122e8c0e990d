/* train.c - `kestrel train margin-mse`: distil a dense or ColBERT student from teacher scores. */
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "train/trainer.h"

static const char *HELP =
    "usage: kestrel train margin-mse --model INIT_DIR --out OUT_DIR --teacher-scores FILE\n"
    "         [--queries FILE --collection FILE] [--batch-size N] [--steps N | --epochs N]\n"
    "         [--lr X] [--optimizer adamw|sgd] [--weight-decay X] [--warmup N] [--schedule linear|cosine]\n"
    "         [--grad-clip X] [--dropout P] [--seed N] [--no-shuffle] [--query-max-len N]\n"
    "         [--doc-max-len N] [--in-batch-weight X] [--format hofstaetter|matchmaker|nway]\n"
    "         [--save-every N] [--resume DIR] [--stop-after N] [--device cpu|cuda]\n"
    "         [--eval-queries F --eval-qrels F [--eval-collection F] [--eval-every N]]\n"
    "\n"
    "Trains the student at INIT_DIR (a sentence-transformers / BERT folder, or a ColBERT folder) so\n"
    "that its score margins match the teacher's (Margin-MSE, Hofstaetter et al. 2020):\n"
    "  loss = mean over b, i of ((s(q,p+) - s(q,p-_i)) - (t(q,p+) - t(q,p-_i)))^2\n"
    "and writes OUT_DIR in the same layout (float32 safetensors, tokenizer files copied), loadable\n"
    "by transformers / sentence-transformers / colbert-ai, with OUT_DIR/train_log.jsonl.\n"
    "\n"
    "Teacher files (streamed):\n"
    "  hofstaetter  pos_score<TAB>neg_score<TAB>qid<TAB>pos_pid<TAB>neg_pid  (+ --queries, --collection)\n"
    "  matchmaker   pos_score<TAB>neg_score<TAB>query<TAB>pos_text<TAB>neg_text\n"
    "  nway         [qid, [pid, score], [pid, score], ...]  (ColBERTv2; + --queries, --collection)\n"
    "Default format: hofstaetter when --queries is given, else matchmaker.\n"
    "\n"
    "  --steps N / --epochs N   optimizer steps, or passes over the file (default 1 epoch)\n"
    "  --lr X                   peak learning rate (2e-5); linear warm-up over --warmup steps,\n"
    "                           then linear (or --schedule cosine) decay to 0\n"
    "  --optimizer adamw|sgd    AdamW (decoupled decay, none on biases and LayerNorm) or plain SGD\n"
    "  --grad-clip X            global-norm clipping (off)\n"
    "  --dropout P              dropout (default: the checkpoint's hidden_dropout_prob)\n"
    "  --no-shuffle             file order: the first batch is the first --batch-size lines\n"
    "  --in-batch-weight X      add X * in-batch negatives cross-entropy (off)\n"
    "  --device cpu|cuda        where the step runs (cpu). cuda: a `make CUDA=1` build on an NVIDIA\n"
    "                           GPU (sm_90) trains in bf16 with float32 master weights: dense students\n"
    "                           (cls / mean / mean_sqrt_len pooling, Normalize) and ColBERT students too\n"
    "                           (MaxSim on the GPU), with or without --in-batch-weight (max pooling and\n"
    "                           a Dense head train on the CPU). Dropout masks\n"
    "                           are drawn differently from the CPU's, so runs agree in distribution only\n"
    "                           (the next batch is read and tokenized while the GPU runs a step;\n"
    "                           KESTREL_GPU_TRAIN_OVERLAP=0 turns that off)\n"
    "\n"
    "Bad input: the teacher file is read through once before training; a missing column, an unknown\n"
    "qid/pid, a NaN score or an empty file stops with the file and line, and OUT_DIR is not created.\n"
    "\n"
    "Resuming:\n"
    "  --save-every N           write OUT_DIR/train_state.bin (weights, AdamW moments, step, schedule\n"
    "                           position, teacher-file position and shuffle buffer, RNGs) every N steps\n"
    "                           and at the end, atomically (a crash mid-save keeps the previous one)\n"
    "  --resume DIR             continue the run whose state is in DIR (usually OUT_DIR itself) with\n"
    "                           the same options; the weights equal those of a run never stopped.\n"
    "                           A fresh run refuses an OUT_DIR that holds a state.\n"
    "  --stop-after N           stop after step N of the schedule, saving the state and the model\n"
    "\n"
    "Evaluation (exhaustive search of a small corpus with the current weights, no dropout):\n"
    "  --eval-queries F         queries (qid<TAB>text or BEIR queries.jsonl); judged ones are used\n"
    "  --eval-qrels F           TREC or BEIR qrels\n"
    "  --eval-collection F      the corpus to rank (default --collection; keep it small: every\n"
    "                           document is encoded at each evaluation)\n"
    "  --eval-every N           evaluate every N steps (default: before the first and after the last)\n"
    "nDCG@10 and MRR@10 (trec_eval's ndcg_cut.10 and recip_rank cut at 10) are printed and logged\n"
    "in train_log.jsonl as {\"step\", \"eval_ndcg@10\", \"eval_mrr@10\", \"eval_queries\", \"eval_docs\"}.\n"
    "\n"
    "Other modes: kestrel train cross (cross-encoders), kestrel train self-distill (bi <-> cross\n"
    "self-distillation); see their --help.\n";

int cmd_train_cross(int argc, char **argv);       /* train_cross.c */
int cmd_train_self_distill(int argc, char **argv); /* train_cross.c */

int cmd_train_vq(int argc, char **argv); /* train_vq.c */

int cmd_train(int argc, char **argv) {
    if (argc >= 2 && strcmp(argv[1], "vq") == 0) return cmd_train_vq(argc - 1, argv + 1);
    if (argc < 2 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0) {
        fputs(HELP, argc < 2 ? stderr : stdout);
        return argc < 2 ? KST_EXIT_USAGE : 0;
    }
    if (strcmp(argv[1], "cross") == 0) return cmd_train_cross(argc, argv);
    if (strcmp(argv[1], "self-distill") == 0) return cmd_train_self_distill(argc, argv);
    if (strcmp(argv[1], "margin-mse") != 0)
        return cli_usage_error("train", "unknown training mode \"%s\" (margin-mse)", argv[1]);
    kst_train_opts o = kst_train_opts_default();
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        size_t n;
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            fputs(HELP, stdout);
            return 0;
        }
        if (strcmp(a, "--no-shuffle") == 0) {
            o.no_shuffle = 1;
            continue;
        }
        if (!v) return cli_usage_error("train", "%s needs a value (or is unknown)", a);
        i++;
        char *end = NULL;
        if (strcmp(a, "--model") == 0) o.model_dir = v;
        else if (strcmp(a, "--out") == 0) o.out_dir = v;
        else if (strcmp(a, "--teacher-scores") == 0) o.teacher_path = v;
        else if (strcmp(a, "--queries") == 0) o.queries_path = v;
        else if (strcmp(a, "--collection") == 0) o.collection_path = v;
        else if (strcmp(a, "--resume") == 0) o.resume_dir = v;
        else if (strcmp(a, "--eval-queries") == 0) o.eval_queries = v;
        else if (strcmp(a, "--eval-qrels") == 0) o.eval_qrels = v;
        else if (strcmp(a, "--eval-collection") == 0) o.eval_collection = v;
        else if (strcmp(a, "--device") == 0) {
            if (cli_device_value(v, &o.device) != 0) return KST_EXIT_USAGE;
        }
        else if (strcmp(a, "--format") == 0) {
            kst_error err;
            if (kst_teacher_format_parse(v, &o.format, &err) != KST_OK) return cli_usage_error("train", "%s", err.msg);
        } else if (strcmp(a, "--optimizer") == 0) {
            if (strcmp(v, "adamw") == 0) o.sgd = 0;
            else if (strcmp(v, "sgd") == 0) o.sgd = 1;
            else return cli_usage_error("train", "--optimizer expects adamw or sgd");
        } else if (strcmp(a, "--schedule") == 0) {
            if (strcmp(v, "linear") == 0) o.cosine = 0;
            else if (strcmp(v, "cosine") == 0) o.cosine = 1;
            else return cli_usage_error("train", "--schedule expects linear or cosine");
        } else if (strcmp(a, "--lr") == 0 || strcmp(a, "--weight-decay") == 0 || strcmp(a, "--grad-clip") == 0 ||
                   strcmp(a, "--dropout") == 0 || strcmp(a, "--in-batch-weight") == 0) {
            double x = strtod(v, &end);
            if (!*v || *end || x < 0) return cli_usage_error("train", "%s expects a non-negative number, got \"%s\"", a, v);
            if (a[2] == 'l') o.lr = x;
            else if (a[2] == 'w') o.weight_decay = x;
            else if (a[2] == 'g') o.grad_clip = x;
            else if (a[2] == 'd') {
                if (x >= 1) return cli_usage_error("train", "--dropout must be below 1");
                o.dropout = x;
            } else o.in_batch_weight = x;
        } else if (strcmp(a, "--batch-size") == 0 || strcmp(a, "--steps") == 0 || strcmp(a, "--epochs") == 0 ||
                   strcmp(a, "--warmup") == 0 || strcmp(a, "--seed") == 0 || strcmp(a, "--query-max-len") == 0 ||
                   strcmp(a, "--doc-max-len") == 0 || strcmp(a, "--save-every") == 0 ||
                   strcmp(a, "--stop-after") == 0 || strcmp(a, "--eval-every") == 0) {
            if (cli_size_value(a, v, &n) != 0) return KST_EXIT_USAGE;
            if (!strcmp(a, "--batch-size")) {
                if (!n) return cli_usage_error("train", "--batch-size must be at least 1");
                o.batch_size = n;
            } else if (!strcmp(a, "--steps")) o.steps = (long)n;
            else if (!strcmp(a, "--epochs")) o.epochs = (long)n;
            else if (!strcmp(a, "--warmup")) o.warmup = (long)n;
            else if (!strcmp(a, "--seed")) o.seed = n;
            else if (!strcmp(a, "--query-max-len")) o.query_max_len = n;
            else if (!strcmp(a, "--save-every")) o.save_every = (long)n;
            else if (!strcmp(a, "--stop-after")) o.stop_after = (long)n;
            else if (!strcmp(a, "--eval-every")) o.eval_every = (long)n;
            else o.doc_max_len = n;
        } else {
            return cli_usage_error("train", "unknown option \"%s\"", a);
        }
    }
    if (!o.model_dir || !o.out_dir || !o.teacher_path)
        return cli_usage_error("train", "--model, --out and --teacher-scores are required");
    kst_train_result r;
    kst_error err;
    int rc = kst_train_margin_mse(&o, &r, &err);
    if (rc != KST_OK) return cli_report("train", rc, &err);
    fprintf(stderr, "kestrel train: %ld steps in %.1fs (%.1f triples/s); loss %.4f -> %.4f; saved %s\n", r.steps,
            r.seconds, r.triples_per_s, r.first_loss, r.last_loss, o.out_dir);
    if (r.evaluated)
        fprintf(stderr, "kestrel train: eval nDCG@10 %.4f -> %.4f, MRR@10 %.4f -> %.4f\n", r.eval_first_ndcg10,
                r.eval_last_ndcg10, r.eval_first_mrr10, r.eval_last_mrr10);
    return 0;
}
