/* rwkv_board.h -- the portable C99 board core: reads an rwkv-stream (.rwks, docs/format.md)
 * front to back through one chunk buffer and runs the RWKV forward pass (v4, v5.1, v5.2, v6,
 * v7) in the int8 arithmetic of the Python simulator (firmware_sim/, mode="int8").
 *
 * No malloc, no OS: every buffer is carved from one caller-provided arena at init
 * (firmware_sim/arena.py's buffer_plan, serial mode: one token per pass, logits kept).
 *
 *   static uint8_t arena[64 * 1024];
 *   static rs_board board;
 *   rs_source src = { NULL, NULL, flash_base };          // XIP: the stream is addressable
 *   int rc = rs_board_init(&board, &src, arena, sizeof arena, 4096);
 *   if (rc) printf("%s\n", rs_strerror(rc));             // board.arena_needed says how much
 *   const float *logits;
 *   rc = rs_board_eval(&board, token, &logits);          // board.n_vocab floats
 */
#ifndef RWKV_BOARD_H
#define RWKV_BOARD_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Where the stream's bytes come from. `read` copies n bytes at `offset` into dst and returns 0,
 * or non-zero on failure (RS_ERR_IO). `mapped` is non-NULL when the whole stream is addressable
 * (installed in XIP flash, or a file in RAM): weights are then used in place and `read` may be
 * NULL. */
typedef struct rs_source {
    int (*read)(void *ctx, uint32_t offset, uint8_t *dst, uint32_t n);
    void *ctx;
    const uint8_t *mapped;   /* non-NULL when the whole stream is addressable (XIP) */
} rs_source;

/* Error codes: 0 or negative. Stable values (the host tool exits with -code). */
typedef enum rs_error {
    RS_OK = 0,
    RS_ERR_IO = -1,             /* the source failed to deliver bytes */
    RS_ERR_FORMAT = -2,         /* a header field or record disagrees with docs/format.md */
    RS_ERR_TYPE = -3,           /* the type table names a type this core does not implement */
    RS_ERR_NO_RAM = -4,         /* the arena is smaller than arena_needed */
    RS_ERR_MAGIC = -5,          /* not a stream: magic is not "RWKS" */
    RS_ERR_VERSION = -6,        /* format major version is not 1 */
    RS_ERR_HEADER_CRC = -7,     /* stream header CRC-32 mismatch */
    RS_ERR_ARCH = -8,           /* unknown RWKV architecture code */
    RS_ERR_RECORD_CRC = -9,     /* a record header's CRC-32 mismatch */
    RS_ERR_PAYLOAD_CRC = -10,   /* a record payload's CRC-32 mismatch (the pass is discarded) */
    RS_ERR_KIND = -11,          /* unknown required record kind */
    RS_ERR_CHUNK = -12,         /* chunk smaller than a record header or a block */
    RS_ERR_TOKEN = -13,         /* token outside the vocabulary */
    RS_ERR_ARG = -14,           /* bad argument (NULL pointer...) */
    RS_ERR_FAILED = -15         /* the board failed earlier (a CRC error mid-pass): init again */
} rs_error;

const char *rs_strerror(int code);   /* one line of text */
const char *rs_errname(int code);    /* "RS_ERR_PAYLOAD_CRC" */

/* The model's numbers, from the stream header. */
typedef struct rs_hparams {
    uint32_t n_vocab, n_embd, n_layer, ffn_size, n_head, head_size;
    uint32_t lora_maa, lora_decay, lora_w, lora_a, lora_v, lora_g;
    float ln_eps, gn_eps;
    uint32_t n_tensors;
} rs_hparams;

/* int8 mode's lane state of one matrix row (ggml's AVX2 accumulators); the arena's `lanes`. */
typedef struct rs_lanes {
    float lane[32];     /* F32/F16: 4 x 8 accumulators; block types: lane[0..7] */
    float summs;        /* Q4_1/Q5_1: sum of m_w * s_x */
    float tail32;       /* F32: the sum after the reduction (columns past n & ~31) */
    double tail64;      /* F16: the same, in double */
} rs_lanes;

typedef struct rs_board {
    /* public, read-only after init */
    uint32_t arch, tokenizer, n_vocab;
    rs_hparams hp;
    float *state;               /* recurrent state, rwkv.cpp's layout (state_bytes) */
    size_t state_bytes;
    float *logits;              /* n_vocab floats after each rs_board_eval */
    size_t arena_needed;        /* bytes the arena must hold (set even when init fails) */
    uint32_t chunk_size;
    uint32_t tokens;            /* tokens evaluated since init */
    uint32_t fail_offset;       /* stream offset of the last format/CRC error, for messages */
    int fail_tensor;            /* tensor index of the last record error, -1 if none */

    /* private */
    rs_source *src;
    uint32_t header_size, emb_offset, emb_row_bytes, after_embedding, body_size;
    uint32_t plan_offset;       /* the header's per-tensor type ids */
    uint32_t type_mask;         /* bit i: type id i is in the type table (ids < 32) */
    uint8_t emb_type;
    uint8_t *header, *chunk;
    float *x, *xn, *delta, *par, *mix, *proj, *tmp, *hidden, *act_f, *act_d, *act_s;
    int8_t *act_q;
    rs_lanes *lanes;
    float *lora, *v_first;
    /* reading the stream */
    uint32_t pos, next;         /* byte offset; index of the next tensor record */
    uint32_t rec_offset, rec_size, rec_rows, rec_cols, rec_n;
    uint8_t rec_type;
    uint32_t crc;
    int verifying, verified_all;
    int failed;
} rs_board;

/* Parse and check the stream header, the type table, the embedding record (its payload CRC
 * too), carve the arena (arena may be NULL to only learn arena_needed, with RS_ERR_NO_RAM) and
 * reset the state. chunk: the chunk buffer's size in bytes (at least 32 and one block). */
int rs_board_init(rs_board *b, rs_source *src, uint8_t *arena, size_t arena_size,
                  uint32_t chunk);

/* One token through the model. *logits (may be NULL) points at board.logits. Each record's
 * payload CRC is checked the first time a pass reads it. */
int rs_board_eval(rs_board *b, uint32_t token, const float **logits);

/* rwkv.cpp's initial state: zeros, v4's pp = -1e30. */
void rs_board_reset(rs_board *b);

/* Bytes the arena needs for a model (what rs_board_init computes); 0 for an unknown arch. */
size_t rs_arena_bytes(uint32_t arch, const rs_hparams *hp, uint32_t chunk);

#ifdef __cplusplus
}
#endif
#endif /* RWKV_BOARD_H */
