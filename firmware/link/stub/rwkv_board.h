/* STAND-IN for firmware/core/rwkv_board.h, used only while the board core is missing (the
 * Makefile picks firmware/core when it exists). Same entry points; the "model" only reads the
 * stream the way a forward pass does (one embedding row, then every record) and makes up
 * deterministic logits from the bytes, so the link can be tested without the core. */
#ifndef RWKV_BOARD_H
#define RWKV_BOARD_H

#include <stddef.h>
#include <stdint.h>

typedef struct rs_source {
    int (*read)(void *ctx, uint32_t offset, uint8_t *dst, uint32_t n);
    void *ctx;
    const uint8_t *mapped;
} rs_source;

enum { RS_OK = 0, RS_ERR_IO = -1, RS_ERR_FORMAT = -2, RS_ERR_TYPE = -3, RS_ERR_NO_RAM = -4,
       RS_ERR_TOKEN = -13 };

typedef struct rs_board {
    rs_source *src;
    uint32_t n_vocab, arch, tokenizer, chunk;
    uint32_t header_size, emb_row_bytes, body_size;
    uint64_t emb_offset;
    float *logits;
    uint8_t *buf;
    float *state;
    size_t state_bytes;
} rs_board;

const char *rs_strerror(int code);
uint32_t rs_type_block_size(uint32_t type_id);   /* 0 when the core lacks the type */

int rs_board_init(rs_board *b, rs_source *src, uint8_t *arena, size_t arena_size, uint32_t chunk);
int rs_board_eval(rs_board *b, uint32_t token, const float **logits);
void rs_board_reset(rs_board *b);

#endif
