/* rwkv_run -- run the board core on a host over a stream file (how tests compare with Python).
 *
 *   rwkv_run [-o LOGITS.f32] [--chunk N] [--arena N] [--xip] [--info] FILE.rwks TOKENS...
 *
 * Reads the stream through a file source (fseek + fread into the chunk buffer), or with --xip
 * from the whole file in memory (the core then reads weights in place, as from XIP flash).
 * After each token: with -o the n_vocab float32 logits are appended to the file (raw,
 * little-endian on a little-endian host), without -o the argmax and its logit are printed.
 * --info prints the model's numbers and the arena bytes. On error prints the code's name and
 * text and exits with status -code (e.g. 10 for RS_ERR_PAYLOAD_CRC).
 */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "rwkv_board.h"

static int file_read(void *ctx, uint32_t offset, uint8_t *dst, uint32_t n) {
    FILE *f = (FILE *)ctx;
    if (fseek(f, (long)offset, SEEK_SET)) return 1;
    return fread(dst, 1, n, f) == n ? 0 : 1;
}

static int die(int rc, const rs_board *b, const char *what) {
    fprintf(stderr, "rwkv_run: %s: %s (%d): %s", what, rs_errname(rc), rc, rs_strerror(rc));
    if (b && (rc == RS_ERR_FORMAT || rc == RS_ERR_RECORD_CRC || rc == RS_ERR_PAYLOAD_CRC
              || rc == RS_ERR_TYPE || rc == RS_ERR_KIND))
        fprintf(stderr, " at offset %lu (tensor %d)", (unsigned long)b->fail_offset,
                b->fail_tensor);
    if (b && rc == RS_ERR_NO_RAM)
        fprintf(stderr, ": needs %lu bytes", (unsigned long)b->arena_needed);
    fputc('\n', stderr);
    return -rc;
}

int main(int argc, char **argv) {
    static rs_board board;
    const char *out_path = NULL, *path = NULL;
    unsigned long chunk = 4096, arena_size = 0;
    int xip = 0, info = 0, i, rc, first_token = 0;
    FILE *f, *out = NULL;
    uint8_t *arena, *mapped = NULL;
    rs_source src;
    for (i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "-o") && i + 1 < argc) out_path = argv[++i];
        else if (!strcmp(argv[i], "--chunk") && i + 1 < argc) chunk = strtoul(argv[++i], 0, 0);
        else if (!strcmp(argv[i], "--arena") && i + 1 < argc) arena_size = strtoul(argv[++i], 0, 0);
        else if (!strcmp(argv[i], "--xip")) xip = 1;
        else if (!strcmp(argv[i], "--info")) info = 1;
        else if (!path) path = argv[i];
        else { first_token = i; break; }
    }
    if (!path) {
        fprintf(stderr, "usage: rwkv_run [-o LOGITS.f32] [--chunk N] [--arena N] [--xip] "
                        "[--info] FILE.rwks TOKENS...\n");
        return 2;
    }
    f = fopen(path, "rb");
    if (!f) {
        perror(path);
        return 2;
    }
    src.read = file_read;
    src.ctx = f;
    src.mapped = NULL;
    if (xip) {
        long size;
        fseek(f, 0, SEEK_END);
        size = ftell(f);
        mapped = malloc((size_t)size + 1);              /* the host tool may; the core never */
        if (!mapped || file_read(f, 0, mapped, (uint32_t)size)) {
            fprintf(stderr, "rwkv_run: cannot read %s\n", path);
            return 2;
        }
        src.mapped = mapped;
    }
    /* learn the arena size first (arena NULL), then give exactly that unless --arena */
    rc = rs_board_init(&board, &src, NULL, 0, (uint32_t)chunk);
    if (rc != RS_ERR_NO_RAM) return die(rc, &board, "init");
    if (!arena_size) arena_size = board.arena_needed;
    arena = malloc(arena_size + 16);
    if (!arena) return 2;
    rc = rs_board_init(&board, &src, arena + 16 - ((uintptr_t)arena & 15u), arena_size,
                       (uint32_t)chunk);
    if (rc) return die(rc, &board, "init");
    if (info)
        printf("arch %lu vocab %lu embd %lu layers %lu ffn %lu heads %lu x %lu chunk %lu "
               "arena %lu state %lu\n",
               (unsigned long)board.arch, (unsigned long)board.hp.n_vocab,
               (unsigned long)board.hp.n_embd, (unsigned long)board.hp.n_layer,
               (unsigned long)board.hp.ffn_size, (unsigned long)board.hp.n_head,
               (unsigned long)board.hp.head_size, (unsigned long)chunk,
               (unsigned long)board.arena_needed, (unsigned long)board.state_bytes);
    if (out_path) {
        out = fopen(out_path, "wb");
        if (!out) {
            perror(out_path);
            return 2;
        }
    }
    for (i = first_token; first_token && i < argc; i++) {
        const float *logits;
        unsigned long token = strtoul(argv[i], 0, 0);
        rc = rs_board_eval(&board, (uint32_t)token, &logits);
        if (rc) return die(rc, &board, "eval");
        if (out) {
            if (fwrite(logits, sizeof(float), board.n_vocab, out) != board.n_vocab) return 2;
        } else {
            uint32_t j, best = 0;
            for (j = 1; j < board.n_vocab; j++)
                if (logits[j] > logits[best]) best = j;
            printf("token %lu -> argmax %lu (%.6g)\n", token, (unsigned long)best,
                   (double)logits[best]);
        }
    }
    if (out && fclose(out)) return 2;
    fclose(f);
    free(arena);
    free(mapped);
    return 0;
}
