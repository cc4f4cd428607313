/* rs_internal.h -- what the forward pass (rs_forward.c) uses of the stream reader
 * (rwkv_board.c): tensors in forward order, each read once per pass through the chunk buffer. */
#ifndef RS_INTERNAL_H
#define RS_INTERNAL_H

#include "rwkv_board.h"

/* Return on error (every reader call returns an rs_error). */
#define RS_TRY(call) do { int rs_rc_ = (call); if (rs_rc_) return rs_rc_; } while (0)

/* tensors per layer (layer 0 of v7 has 3 fewer) */
uint32_t rs_layer_tensors(uint32_t arch, uint32_t layer);
uint32_t rs_expected_tensors(uint32_t arch, uint32_t n_layer);

/* Start a pass: the embedding row of `token` into b->x, then position at tensor 1. */
int rs_read_embedding(rs_board *b, uint32_t token, float *out);
/* The next tensor (a small one) whole into out; n: its element count, checked. */
int rs_vector(rs_board *b, float *out, uint32_t n);
/* out = W x for the next tensor W (rows x cols): x has cols values, out gets rows. */
int rs_matvec(rs_board *b, const float *x, uint32_t cols, float *out, uint32_t rows);
/* The next tensor as `parts` consecutive groups of `rows` rows, part p: out[p] = W_p x[p]. */
int rs_matvec_parts(rs_board *b, const float *const *x, uint32_t cols, float *const *out,
                    uint32_t rows, uint32_t parts);

/* After the last tensor of the first pass: the END record must follow (optional records may
 * come first) and end at body_size. Later passes: nothing. */
int rs_check_end(rs_board *b);

/* The forward pass of one token (rs_forward.c); logits into b->logits. */
int rs_forward(rs_board *b, uint32_t token);

/* arena rows per version: parameter vectors, token-shift-mixed inputs */
uint32_t rs_param_rows(uint32_t arch);
uint32_t rs_mix_rows(uint32_t arch);

#endif
