/* rs_kernels.h -- the int8-mode kernels: dequantize, prepare the activation, fused
 * dequantize-and-dot over runs of whole blocks (formats/kernels.py, int8 mode). */
#ifndef RS_KERNELS_H
#define RS_KERNELS_H

#include <stdint.h>

#include "rwkv_board.h"

/* block size (elements) and bytes of a type id; 0 when the core lacks the type */
uint32_t rs_type_block_size(uint32_t type_id);
uint32_t rs_type_block_bytes(uint32_t type_id);
const char *rs_type_name(uint32_t type_id);

float rs_f16_to_f32(uint16_t h);
uint16_t rs_f32_to_f16(float f);      /* round to nearest even, as numpy's astype(float16) */

/* n_blocks whole blocks at buf -> out[0 .. n_blocks * block_size) (ggml's dequantize_row_*) */
void rs_dequantize(uint32_t type_id, const uint8_t *buf, uint32_t n_blocks, float *out);

/* The activation x[0..n) in the form the type's dot needs (ggml's vec_dot_type): F32 as is,
 * F16 fp16-rounded, BF16 bf16-rounded (into xf); Q4_0/Q5_0/Q8_0 as Q8_0 and Q4_1/Q5_1 as Q8_1
 * (xq, xd, xs), as ggml's AVX2 quantize_row_q8_0/1. */
void rs_prepare(uint32_t type_id, const float *x, uint32_t n, float *xf, int8_t *xq, float *xd,
                float *xs);

/* out[row] = dot(row, x) for the n_blocks blocks at buf, global blocks first_block ... of a
 * row-major matrix with blocks_per_row blocks a row. A row cut by the end of the run keeps its
 * lanes in *st; the next call must continue that row. out[row] is written when the row's last
 * block is in (out need not be zeroed). */
void rs_matvec_blocks(uint32_t type_id, const uint8_t *buf, uint32_t n_blocks,
                      uint32_t first_block, uint32_t blocks_per_row, const float *xf,
                      const int8_t *xq, const float *xd, const float *xs, float *out,
                      rs_lanes *st);

#endif
