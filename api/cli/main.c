/* main.c - the kestrel command-line tool: dispatches to one file per subcommand. */
#include <stdio.h>
#include <string.h>

#include "cli.h"

static const struct {
    const char *name;
    int (*run)(int, char **);
    const char *summary;
} commands[] = {
    {"tokenize", cmd_tokenize, "print the token ids a model feeds its transformer"},
    {"embed", cmd_embed, "embed lines of text into a .npy file"},
    {"score", cmd_score, "score query<TAB>passage pairs (similarity, MaxSim or logits)"},
    {"index", cmd_index, "build, add to, delete from or describe an index folder"},
    {"search", cmd_search, "search an index: one query, or a query file into a TREC run"},
    {"train", cmd_train, "train students (margin-mse), cross-encoders (cross), bi <-> cross (self-distill)"},
    {"mine", cmd_mine, "training triples with hard negatives from an index's first stage"},
    {"eval", cmd_eval, "evaluate a TREC run against qrels (MRR@10, nDCG@10, recall, MAP)"},
    {"teach", cmd_teach, "score training triples with a cross-encoder (local or /rerank URL) into a teacher file"},
    {"serve-rerank", cmd_serve_rerank, "serve a cross-encoder over HTTP (text-embeddings-inference /rerank API)"},
};

static void usage(FILE *fp) {
    fprintf(fp, "usage: kestrel <command> [options]   (kestrel <command> --help for details)\n\n");
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        fprintf(fp, "  %-10s %s\n", commands[i].name, commands[i].summary);
    fprintf(fp, "\nexit codes: 0 ok; 2 I/O error; 3 malformed input; 4 out of memory; 5 not found;\n"
                "6 unsupported; 7 tensor shape/dtype mismatch; 64 usage error\n");
}

int main(int argc, char **argv) {
    if (argc < 2 || strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 ||
        strcmp(argv[1], "help") == 0) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? KST_EXIT_USAGE : 0;
    }
    if (strcmp(argv[1], "--version") == 0) {
        printf("kestrel %s (%s)\n", kst_version(), kst_build_info());
        return 0;
    }
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        if (strcmp(argv[1], commands[i].name) == 0) return commands[i].run(argc - 1, argv + 1);
    fprintf(stderr, "kestrel: unknown command \"%s\"\n", argv[1]);
    usage(stderr);
    return KST_EXIT_USAGE;
}
