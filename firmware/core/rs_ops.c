/* rs_ops.c -- firmware_sim/ops.py in C99, operation for operation, in the same order, so that
 * the float32 results are the same bits (the reductions reproduce numpy's pairwise sum and, for
 * v7's state products, numpy's einsum order). */
#include "rs_ops.h"

#include <math.h>
#include <stddef.h>

#ifndef RS_EXPF
#define RS_EXPF(x) ((float)exp((double)(x)))
#endif
#ifndef RS_TANHF
#define RS_TANHF(x) ((float)tanh((double)(x)))
#endif

float rs_exp(float x) { return RS_EXPF(x); }
float rs_tanh(float x) { return RS_TANHF(x); }

/* numpy's pairwise_sum: below 8 elements a plain loop; up to 128 eight accumulators and
 * ((r0+r1)+(r2+r3)) + ((r4+r5)+(r6+r7)), then the rest; above, split at n/2 rounded down to a
 * multiple of 8. A reduction starts from 0 and adds this. `mode` says what is summed. */
enum { SUM_F, SUM_SQ32, SUM_SQ64 };

static double term64(const float *x, uint32_t i, int mode) {
    if (mode == SUM_F) return (double)x[i];
    if (mode == SUM_SQ32) return (double)(x[i] * x[i]);
    return (double)x[i] * (double)x[i];
}

static double pairwise64(const float *x, uint32_t n, int mode) {
    if (n < 8) {
        double res = 0.0;
        uint32_t i;
        for (i = 0; i < n; i++) res += term64(x, i, mode);
        return res;
    }
    if (n <= 128) {
        double r[8], res;
        uint32_t i, j;
        for (j = 0; j < 8; j++) r[j] = term64(x, j, mode);
        for (i = 8; i < n - (n % 8); i += 8)
            for (j = 0; j < 8; j++) r[j] += term64(x, i + j, mode);
        res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for (; i < n; i++) res += term64(x, i, mode);
        return res;
    } else {
        uint32_t n2 = n / 2;
        n2 -= n2 % 8;
        return pairwise64(x, n2, mode) + pairwise64(x + n2, n - n2, mode);
    }
}

static float pairwise32(const float *x, uint32_t n) {
    if (n < 8) {
        float res = 0.0f;
        uint32_t i;
        for (i = 0; i < n; i++) res += x[i];
        return res;
    }
    if (n <= 128) {
        float r[8], res;
        uint32_t i, j;
        for (j = 0; j < 8; j++) r[j] = x[j];
        for (i = 8; i < n - (n % 8); i += 8)
            for (j = 0; j < 8; j++) r[j] += x[i + j];
        res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for (; i < n; i++) res += x[i];
        return res;
    } else {
        uint32_t n2 = n / 2;
        n2 -= n2 % 8;
        return pairwise32(x, n2) + pairwise32(x + n2, n - n2);
    }
}

double rs_sum64(const float *x, uint32_t n) { return 0.0 + pairwise64(x, n, SUM_F); }
double rs_sumsq32_64(const float *x, uint32_t n) { return 0.0 + pairwise64(x, n, SUM_SQ32); }
double rs_sumsq64(const float *x, uint32_t n) { return 0.0 + pairwise64(x, n, SUM_SQ64); }
float rs_sum32(const float *x, uint32_t n) { return 0.0f + pairwise32(x, n); }

/* out = (x - mean) / sqrt(var + eps) * w + b; mean and sum of squares in double (ggml_norm).
 * w, b NULL: 1 and 0 (group_norm's inner call). x may alias out. */
static void norm(const float *x, const float *w, const float *b, float eps, float *out,
                 uint32_t n) {
    uint32_t i;
    float mean = (float)(rs_sum64(x, n) / (double)n), variance, scale;
    for (i = 0; i < n; i++) out[i] = x[i] - mean;
    variance = (float)(rs_sumsq32_64(out, n) / (double)n);
    scale = 1.0f / sqrtf(variance + eps);
    for (i = 0; i < n; i++) out[i] *= scale;
    if (w) {
        for (i = 0; i < n; i++) out[i] *= w[i];
        for (i = 0; i < n; i++) out[i] += b[i];
    } else {
        for (i = 0; i < n; i++) out[i] *= 1.0f;
        for (i = 0; i < n; i++) out[i] += 0.0f;
    }
}

void rs_layer_norm(const float *x, const float *w, const float *b, float eps, float *out,
                   uint32_t n) {
    norm(x, w, b, eps, out, n);
}

void rs_group_norm(const float *x, const float *w, const float *b, uint32_t groups, float eps,
                   float *out, uint32_t n) {
    uint32_t g, i, s = n / groups;
    for (g = 0; g < groups; g++) norm(x + g * s, 0, 0, eps, out + g * s, s);
    for (i = 0; i < n; i++) out[i] *= w[i];
    for (i = 0; i < n; i++) out[i] += b[i];
}

/* v4/v5: out = x*m + (prev - prev*m), rwkv.cpp's order */
void rs_token_shift_mix(const float *x, const float *prev, const float *m, float *out,
                        uint32_t n) {
    uint32_t i;
    for (i = 0; i < n; i++) {
        float t = prev[i] - prev[i] * m[i];
        out[i] = t + x[i] * m[i];
    }
}

/* v6/v7: out = delta*m + x, delta = prev - x */
void rs_shift_lerp(const float *x, const float *delta, const float *m, float *out, uint32_t n) {
    uint32_t i;
    for (i = 0; i < n; i++) out[i] = delta[i] * m[i] + x[i];
}

void rs_sigmoid(const float *x, float *out, uint32_t n) {
    uint32_t i;
    for (i = 0; i < n; i++) out[i] = 1.0f / (rs_exp(-x[i]) + 1.0f);
}

void rs_silu(const float *x, float *out, uint32_t n) {
    uint32_t i;
    for (i = 0; i < n; i++) out[i] = x[i] / (rs_exp(-x[i]) + 1.0f);
}

void rs_relu_squared(float *x, uint32_t n) {
    uint32_t i;
    for (i = 0; i < n; i++) {
        float v = x[i] >= 0.0f ? x[i] : 0.0f;
        if (x[i] != x[i]) v = x[i];                 /* np.maximum propagates NaN */
        x[i] = v * v;
    }
}

void rs_tanh_vec(float *x, uint32_t n) {
    uint32_t i;
    for (i = 0; i < n; i++) x[i] = rs_tanh(x[i]);
}

void rs_exp_vec(float *x, uint32_t n) {
    uint32_t i;
    for (i = 0; i < n; i++) x[i] = rs_exp(x[i]);
}

static float maxf(float a, float b) {           /* np.maximum(a, b) */
    if (a != a) return a;
    if (b != b) return b;
    return a >= b ? a : b;
}

void rs_wkv_v4(const float *k, const float *v, const float *u, const float *w, float *aa,
               float *bb, float *pp, float *out, uint32_t n) {
    uint32_t i;
    for (i = 0; i < n; i++) {
        float ww = u[i] + k[i], q = maxf(pp[i], ww);
        float e1 = rs_exp(pp[i] - q), e2 = rs_exp(ww - q);
        out[i] = (e1 * aa[i] + e2 * v[i]) / (e1 * bb[i] + e2);
        ww = pp[i] + w[i];
        q = maxf(ww, k[i]);
        e1 = rs_exp(ww - q);
        e2 = rs_exp(k[i] - q);
        aa[i] = aa[i] * e1 + e2 * v[i];
        bb[i] = bb[i] * e1 + e2;
        pp[i] = q;
    }
}

/* ops._fma: a*b exact in double, + c rounded in double, then to float (as the simulator) */
static float fma_sim(float a, float b, float c) {
    return (float)((double)a * (double)b + (double)c);
}

/* v5/v6 per head; state [h][key i][value j] */
void rs_wkv_v5(const float *r, const float *k, const float *v, const float *u, const float *w,
               float *state, float *out, uint32_t H, uint32_t S) {
    uint32_t h, i, j;
    for (j = 0; j < H * S; j++) out[j] = 0.0f;
    for (i = 0; i < S; i++) {
        for (h = 0; h < H; h++) {
            float *st = state + ((size_t)h * S + i) * S;
            float ki = k[h * S + i], ui = u[h * S + i], ri = r[h * S + i], wi = w[h * S + i];
            for (j = 0; j < S; j++) {
                float prev = st[j], kv = v[h * S + j] * ki;
                float temp = fma_sim(kv, ui, prev);
                out[h * S + j] = fma_sim(temp, ri, out[h * S + j]);
                st[j] = fma_sim(prev, wi, kv);
            }
        }
    }
}

/* np.einsum("hij,hj->hi") for one (h, i): numpy's baseline-SIMD sum of products (4 float
 * lanes, blocks of 16 taken from the last 4 to the first, multiply then add, then the lanes
 * by two horizontal adds) added to 0. */
static float einsum_dot(const float *a, const float *b, uint32_t n) {
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    uint32_t c = 0;
    int g, l;
    for (; n - c >= 16; c += 16)
        for (g = 3; g >= 0; g--)
            for (l = 0; l < 4; l++) acc[l] = a[c + 4 * g + l] * b[c + 4 * g + l] + acc[l];
    for (; c < n; c += 4)
        for (l = 0; l < 4; l++)
            acc[l] = (c + l < n ? a[c + l] * b[c + l] : 0.0f) + acc[l];
    return 0.0f + ((acc[0] + acc[1]) + (acc[2] + acc[3]));
}

/* v7 per head; state [h][value i][key j]; sa: H*S scratch */
void rs_wkv_v7(const float *r, const float *w, const float *k, const float *v,
               const float *alpha, const float *beta, float *state, float *out, float *sa,
               uint32_t H, uint32_t S) {
    uint32_t h, i, j;
    for (h = 0; h < H; h++)
        for (i = 0; i < S; i++)
            sa[h * S + i] = einsum_dot(state + ((size_t)h * S + i) * S, alpha + h * S, S);
    for (h = 0; h < H; h++)
        for (i = 0; i < S; i++) {
            float *st = state + ((size_t)h * S + i) * S;
            for (j = 0; j < S; j++) st[j] *= w[h * S + j];
            for (j = 0; j < S; j++)
                st[j] += v[h * S + i] * k[h * S + j] + sa[h * S + i] * beta[h * S + j];
        }
    for (h = 0; h < H; h++)
        for (i = 0; i < S; i++)
            out[h * S + i] = einsum_dot(state + ((size_t)h * S + i) * S, r + h * S, S);
}

void rs_l2_normalize_heads(const float *x, uint32_t H, uint32_t S, float *out) {
    uint32_t h, i;
    for (h = 0; h < H; h++) {
        double norm = sqrt(rs_sumsq64(x + h * S, S));
        if (!(norm >= 1e-12)) norm = norm != norm ? norm : 1e-12;   /* np.maximum */
        for (i = 0; i < S; i++) out[h * S + i] = (float)((double)x[h * S + i] / norm);
    }
}
