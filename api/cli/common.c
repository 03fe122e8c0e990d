/* common.c - option parsing, stdin lines and error reporting shared by the subcommands. */
#define _POSIX_C_SOURCE 200809L
#include <errno.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"

int cli_size_value(const char *opt, const char *val, size_t *out) {
    if (!val) {
        fprintf(stderr, "kestrel: %s needs a value\n", opt);
        return -1;
    }
    char *end;
    errno = 0;
    unsigned long long v = strtoull(val, &end, 10);
    if (errno || *end || !*val || val[0] == '-') {
        fprintf(stderr, "kestrel: %s expects a non-negative integer, got \"%s\"\n", opt, val);
        return -1;
    }
    *out = (size_t)v;
    return 0;
}

int cli_device_value(const char *val, int *out) {
    if (val && strcmp(val, "cpu") == 0) *out = KST_DEVICE_CPU;
    else if (val && (strcmp(val, "cuda") == 0 || strcmp(val, "gpu") == 0)) *out = KST_DEVICE_CUDA;
    else return fprintf(stderr, "kestrel: --device expects cpu or cuda, got \"%s\"\n", val ? val : ""), -1;
    return 0;
}

int cli_model_option(cli_model_args *a, int argc, char **argv, int *i) {
    const char *o = argv[*i];
    const char *v = *i + 1 < argc ? argv[*i + 1] : NULL;
    size_t n;
    if (strcmp(o, "--model") == 0) {
        if (!v) return fprintf(stderr, "kestrel: --model needs a folder\n"), -1;
        a->model = v;
    } else if (strcmp(o, "--kind") == 0) {
        if (!v) return fprintf(stderr, "kestrel: --kind needs dense, colbert or cross\n"), -1;
        if (strcmp(v, "dense") == 0) a->kind = KST_MODEL_DENSE;
        else if (strcmp(v, "colbert") == 0) a->kind = KST_MODEL_COLBERT;
        else if (strcmp(v, "cross") == 0) a->kind = KST_MODEL_CROSS;
        else return fprintf(stderr, "kestrel: --kind expects dense, colbert or cross, got \"%s\"\n", v), -1;
    } else if (strcmp(o, "--max-len") == 0) {
        if (cli_size_value(o, v, &a->max_len) != 0) return -1;
    } else if (strcmp(o, "--batch-size") == 0) {
        if (cli_size_value(o, v, &a->batch_size) != 0) return -1;
        if (a->batch_size == 0) return fprintf(stderr, "kestrel: --batch-size must be at least 1\n"), -1;
    } else if (strcmp(o, "--threads") == 0) {
        if (cli_size_value(o, v, &n) != 0) return -1;
        a->threads = (int)n;
    } else if (strcmp(o, "--device") == 0) {
        if (cli_device_value(v, &a->device) != 0) return -1;
    } else {
        return 0;
    }
    (*i)++;
    return 1;
}

kst_model *cli_open_model(const cli_model_args *a, int *code) {
    kst_model_opts o = kst_model_opts_default();
    o.kind = a->kind;
    o.num_threads = a->threads;
    o.device = a->device;
    kst_model *m = NULL;
    kst_error err;
    int rc = kst_model_open(a->model, &o, &m, &err);
    if (rc != KST_OK) {
        *code = cli_report("model", rc, &err);
        return NULL;
    }
    return m;
}

int cli_report(const char *cmd, int rc, const kst_error *err) {
    fprintf(stderr, "kestrel %s: %s\n", cmd, err && err->msg[0] ? err->msg : kst_status_str(rc));
    switch (rc) {
    case KST_ERR_NOTFOUND:
        fprintf(stderr, "hint: check the path; a model folder needs config.json and model.safetensors\n");
        break;
    case KST_ERR_UNSUPPORTED:
        fprintf(stderr, "hint: see README.md, section \"Models\", for the supported layouts\n");
        break;
    case KST_ERR_SHAPE:
        fprintf(stderr, "hint: the weights do not match config.json; re-save the checkpoint with transformers\n");
        break;
    default:
        break;
    }
    return rc < 0 && rc > -64 ? -rc : 1;
}

int cli_usage_error(const char *cmd, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "kestrel %s: ", cmd);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, "\nsee: kestrel %s --help\n", cmd);
    return KST_EXIT_USAGE;
}

long cli_read_lines(FILE *fp, size_t max, cli_lines *l) {
    char *line = NULL;
    size_t cap = 0;
    long got = 0;
    while ((size_t)got < max) {
        ssize_t r = getline(&line, &cap, fp);
        if (r < 0) break;
        l->bytes += (size_t)r;
        l->lineno++;
        size_t n = (size_t)r;
        if (n && line[n - 1] == '\n') n--;
        if (n && line[n - 1] == '\r') n--;
        if (l->n == l->cap) {
            size_t nc = l->cap ? l->cap * 2 : 1024;
            char **t = realloc(l->text, nc * sizeof *t);
            size_t *ln = t ? realloc(l->len, nc * sizeof *ln) : NULL;
            if (t) l->text = t;
            if (!t || !ln) {
                free(line);
                return -1;
            }
            l->len = ln;
            l->cap = nc;
        }
        char *copy = malloc(n + 1);
        if (!copy) {
            free(line);
            return -1;
        }
        memcpy(copy, line, n);
        copy[n] = '\0';
        l->text[l->n] = copy;
        l->len[l->n] = n;
        l->n++;
        got++;
    }
    free(line);
    if (ferror(fp)) return -1;
    return got;
}

void cli_lines_clear(cli_lines *l) {
    for (size_t i = 0; i < l->n; i++) free(l->text[i]);
    l->n = 0;
}
