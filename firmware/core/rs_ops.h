/* rs_ops.h -- the elementwise operations of the forward pass (firmware_sim/ops.py), one
 * function each, on float32 vectors the caller owns. */
#ifndef RS_OPS_H
#define RS_OPS_H

#include <stdint.h>

/* float32 exp as the simulator computes it: exp in double, rounded once to float (glibc's
 * expf is not correctly rounded; this is, up to double rounding). A board without a fast
 * double exp may define RS_EXPF(x) as expf(x): then logits are no longer bit-identical. */
float rs_exp(float x);
/* float32 tanh: see README (numpy's SIMD tanh is not reproduced bit for bit). */
float rs_tanh(float x);

/* numpy's pairwise summation (np.sum over a contiguous axis), in double or float */
double rs_sum64(const float *x, uint32_t n);          /* sum of (double)x[i] */
double rs_sumsq32_64(const float *x, uint32_t n);     /* sum of (double)(x[i]*x[i]) */
double rs_sumsq64(const float *x, uint32_t n);        /* sum of (double)x[i]*(double)x[i] */
float rs_sum32(const float *x, uint32_t n);           /* float32 accumulation */

void rs_layer_norm(const float *x, const float *w, const float *b, float eps, float *out,
                   uint32_t n);
void rs_group_norm(const float *x, const float *w, const float *b, uint32_t groups, float eps,
                   float *out, uint32_t n);
void rs_token_shift_mix(const float *x, const float *prev, const float *m, float *out,
                        uint32_t n);
void rs_shift_lerp(const float *x, const float *delta, const float *m, float *out, uint32_t n);
void rs_sigmoid(const float *x, float *out, uint32_t n);
void rs_silu(const float *x, float *out, uint32_t n);
void rs_relu_squared(float *x, uint32_t n);
void rs_tanh_vec(float *x, uint32_t n);
void rs_exp_vec(float *x, uint32_t n);
void rs_wkv_v4(const float *k, const float *v, const float *u, const float *w, float *aa,
               float *bb, float *pp, float *out, uint32_t n);
void rs_wkv_v5(const float *r, const float *k, const float *v, const float *u, const float *w,
               float *state, float *out, uint32_t H, uint32_t S);
void rs_wkv_v7(const float *r, const float *w, const float *k, const float *v,
               const float *alpha, const float *beta, float *state, float *out, float *sa,
               uint32_t H, uint32_t S);
void rs_l2_normalize_heads(const float *x, uint32_t H, uint32_t S, float *out);

#endif
