/* cli.h - what the kestrel subcommands share: option parsing, stdin lines, exit codes.
 *
 * Exit codes are stable: 0 success; 1..9 the negated kst_status of the failing library call
 * (2 I/O, 3 malformed input, 4 out of memory, 5 not found, 6 unsupported, 7 shape mismatch);
 * 64 a usage error. */
#ifndef KST_CLI_H
#define KST_CLI_H

#include <stddef.h>
#include <stdio.h>

#include "api/kestrel.h"

#define KST_EXIT_USAGE 64

/* Options every model command accepts. */
typedef struct cli_model_args {
    const char *model;
    kst_model_kind kind;
    size_t max_len;
    size_t batch_size;
    int threads;
    int device; /* KST_DEVICE_CPU or KST_DEVICE_CUDA (--device) */
} cli_model_args;

/* Parses a common model option at argv[*i] (advancing *i past its value). Returns 1 when
 * consumed, 0 when not a common option, -1 on a bad value (message printed). */
int cli_model_option(cli_model_args *a, int argc, char **argv, int *i);
/* Parses --device's value ("cpu" or "cuda") into *out; -1 and a message on failure. */
int cli_device_value(const char *val, int *out);
/* Parses a non-negative integer option value; -1 and a message on failure. */
int cli_size_value(const char *opt, const char *val, size_t *out);
/* Opens the model; prints the error and returns NULL on failure (*code gets the exit code). */
kst_model *cli_open_model(const cli_model_args *a, int *code);
/* Prints "kestrel CMD: message" and a hint; returns the exit code for status rc. */
int cli_report(const char *cmd, int rc, const kst_error *err);
/* Usage error: prints the message and "see kestrel CMD --help"; returns KST_EXIT_USAGE. */
int cli_usage_error(const char *cmd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Reads up to `max` lines from fp (without their "\n" or "\r\n"); the whole line is the text.
 * Lines are owned by the list; cli_lines_clear frees them. Returns count read, -1 on error. */
typedef struct cli_lines {
    char **text;
    size_t *len;
    size_t n, cap;
    size_t lineno; /* lines consumed so far from the stream (for messages) */
    size_t bytes;  /* bytes consumed so far (for progress) */
} cli_lines;
long cli_read_lines(FILE *fp, size_t max, cli_lines *lines);
void cli_lines_clear(cli_lines *lines);

int cmd_tokenize(int argc, char **argv);
int cmd_embed(int argc, char **argv);
int cmd_score(int argc, char **argv);
int cmd_index(int argc, char **argv);
int cmd_search(int argc, char **argv);
int cmd_train(int argc, char **argv);
int cmd_mine(int argc, char **argv);
int cmd_eval(int argc, char **argv);
int cmd_teach(int argc, char **argv);
int cmd_serve_rerank(int argc, char **argv);

#endif
