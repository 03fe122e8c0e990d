/* save_checkpoint.c - opens a checkpoint folder with Kestrel and saves it again with
 * kst_checkpoint_save: `save_checkpoint SRC_DIR OUT_DIR [dense|colbert|cross]`. Used by
 * tests/fixtures/verify_saved.py to hand Kestrel-written checkpoints to the Python libraries. */
#include <stdio.h>
#include <string.h>

#include "encoders/checkpoint.h"

int main(int argc, char **argv) {
    if (argc < 3 || argc > 4) {
        fprintf(stderr, "usage: %s SRC_DIR OUT_DIR [dense|colbert|cross]\n", argv[0]);
        return 2;
    }
    kst_role role = KST_ROLE_AUTO;
    if (argc == 4) {
        if (strcmp(argv[3], "dense") == 0) role = KST_ROLE_DENSE;
        else if (strcmp(argv[3], "colbert") == 0) role = KST_ROLE_COLBERT;
        else if (strcmp(argv[3], "cross") == 0) role = KST_ROLE_CROSS;
        else {
            fprintf(stderr, "unknown role %s\n", argv[3]);
            return 2;
        }
    }
    kst_encoder *e = NULL;
    kst_error err;
    int rc = kst_encoder_open(argv[1], role, &e, &err);
    if (rc == KST_OK) rc = kst_checkpoint_save(e, argv[2], &err);
    kst_encoder_free(e);
    if (rc != KST_OK) {
        fprintf(stderr, "save_checkpoint: %s\n", err.msg);
        return 1;
    }
    printf("%s -> %s (%s)\n", argv[1], argv[2], kst_role_name(role));
    return 0;
}
