/* rs_kernels.c -- int8-mode kernels, the C twin of formats/kernels.py's int8 mode.
 *
 * Arithmetic (every step float32 unless said otherwise; fmaf is one rounding, as ggml's FMA):
 * - F32/F16 rows (ggml_vec_dot_f32/_f16 on AVX2): 32 lanes; column c < n & ~31 goes into lane
 *   c % 32 by fmaf(w, x, lane); GGML_F32x8_REDUCE of the lanes; the remaining columns are added
 *   to that sum, F32 by fmaf in float32, F16 as float32 products summed in double.
 * - BF16 rows: the bf16-rounded activation, products added left to right (float mode).
 * - Block types (ggml_vec_dot_q*_q8_*): 8 lanes; lane k of a block is the exact integer sum of
 *   q_w * q_x over elements 4k..4k+3; acc[k] = fmaf(d_w * d_x, lane_k, acc[k]); the row is
 *   ((a0+a4) + (a2+a6)) + ((a1+a5) + (a3+a7)), plus for Q4_1/Q5_1 the float32 running sum of
 *   m_w * s_x over the row's blocks.
 * Integer sums are exact and every float operation is the same IEEE operation in the same
 * order as the simulator's, so the results are bit-identical to it (compile with
 * -ffp-contract=off and without -ffast-math: the compiler must not fuse or reorder).
 */
#include "rs_kernels.h"

#include <math.h>
#include <string.h>

#include "stream_format.h"

#define QK 32

uint32_t rs_type_block_size(uint32_t t) {
    switch (t) {
    case RS_TYPE_F32: case RS_TYPE_F16: case RS_TYPE_BF16: return 1;
    case RS_TYPE_Q4_0: case RS_TYPE_Q4_1: case RS_TYPE_Q5_0: case RS_TYPE_Q5_1:
    case RS_TYPE_Q8_0: return QK;
    default: return 0;
    }
}

uint32_t rs_type_block_bytes(uint32_t t) {
    switch (t) {
    case RS_TYPE_F32: return RS_TYPE_F32_BLOCK_BYTES;
    case RS_TYPE_F16: return RS_TYPE_F16_BLOCK_BYTES;
    case RS_TYPE_BF16: return RS_TYPE_BF16_BLOCK_BYTES;
    case RS_TYPE_Q4_0: return RS_TYPE_Q4_0_BLOCK_BYTES;
    case RS_TYPE_Q4_1: return RS_TYPE_Q4_1_BLOCK_BYTES;
    case RS_TYPE_Q5_0: return RS_TYPE_Q5_0_BLOCK_BYTES;
    case RS_TYPE_Q5_1: return RS_TYPE_Q5_1_BLOCK_BYTES;
    case RS_TYPE_Q8_0: return RS_TYPE_Q8_0_BLOCK_BYTES;
    default: return 0;
    }
}

const char *rs_type_name(uint32_t t) {
    switch (t) {
    case RS_TYPE_F32: return "F32";
    case RS_TYPE_F16: return "F16";
    case RS_TYPE_BF16: return "BF16";
    case RS_TYPE_Q4_0: return "Q4_0";
    case RS_TYPE_Q4_1: return "Q4_1";
    case RS_TYPE_Q5_0: return "Q5_0";
    case RS_TYPE_Q5_1: return "Q5_1";
    case RS_TYPE_Q8_0: return "Q8_0";
    default: return NULL;
    }
}

/* -- bit casts and fp16/bf16 ------------------------------------------------------------------ */
static uint32_t f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static float bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static uint16_t le16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }
static uint32_t le32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

float rs_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
    float f;
    if (e == 0x1F) return bits_f32(sign | 0x7F800000u | (m << 13));
    if (e != 0) return bits_f32(sign | ((e + 112u) << 23) | (m << 13));
    f = (float)m * 5.9604644775390625e-08f;              /* m * 2**-24, exact */
    return sign ? -f : f;
}

uint16_t rs_f32_to_f16(float f) {
    uint32_t u = f32_bits(f);
    uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7FFFFFFFu;
    if (a >= 0x7F800000u) {                                /* inf or NaN */
        uint32_t h;
        if (a == 0x7F800000u) return (uint16_t)(sign | 0x7C00u);
        h = 0x7C00u + ((a & 0x7FFFFFu) >> 13);
        if (h == 0x7C00u) h = 0x7C01u;
        return (uint16_t)(sign | h);
    }
    if (a >= 0x477FF000u) return (uint16_t)(sign | 0x7C00u);        /* rounds to inf */
    if (a >= 0x38800000u)                                            /* normal half */
        return (uint16_t)(sign | ((a + 0xFFFu + ((a >> 13) & 1u) - 0x38000000u) >> 13));
    if (a <= 0x33000000u) return (uint16_t)sign;                     /* rounds to zero */
    {                                                                /* subnormal half */
        uint32_t mant = (a & 0x7FFFFFu) | 0x800000u, shift = 126u - (a >> 23);
        uint32_t q = mant >> shift, rem = mant & ((1u << shift) - 1u), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (q & 1u))) q++;
        return (uint16_t)(sign | q);
    }
}

static float f16_round(float f) { return rs_f16_to_f32(rs_f32_to_f16(f)); }

static float bf16_round(float f) {
    uint32_t u = f32_bits(f), h;
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) h = (u >> 16) | 64u;
    else h = ((u + (0x7FFFu + ((u >> 16) & 1u))) >> 16) & 0xFFFFu;
    return bits_f32(h << 16);
}

/* -- block quants ----------------------------------------------------------------------------- */
/* The 32 quants of a block in element order, as the dot uses them (Q4_0/Q5_0 minus 8/16). */
static void block_quants(uint32_t t, const uint8_t *b, int32_t *q) {
    int j;
    const uint8_t *qs;
    uint32_t qh = 0;
    int off = 0;
    if (t == RS_TYPE_Q8_0) {
        for (j = 0; j < QK; j++) q[j] = (int8_t)b[2 + j];
        return;
    }
    switch (t) {
    case RS_TYPE_Q4_0: qs = b + 2; off = 8; break;
    case RS_TYPE_Q4_1: qs = b + 4; break;
    case RS_TYPE_Q5_0: qs = b + 6; qh = le32(b + 2); off = 16; break;
    default: /* Q5_1 */ qs = b + 8; qh = le32(b + 4); break;
    }
    for (j = 0; j < 16; j++) {
        q[j] = qs[j] & 15;
        q[j + 16] = qs[j] >> 4;
    }
    if (t == RS_TYPE_Q5_0 || t == RS_TYPE_Q5_1)
        for (j = 0; j < QK; j++) q[j] |= (int32_t)(((qh >> j) & 1u) << 4);
    for (j = 0; j < QK; j++) q[j] -= off;
}

static int has_min(uint32_t t) { return t == RS_TYPE_Q4_1 || t == RS_TYPE_Q5_1; }

void rs_dequantize(uint32_t t, const uint8_t *buf, uint32_t n_blocks, float *out) {
    uint32_t i, j;
    int32_t q[QK];
    switch (t) {
    case RS_TYPE_F32:
        for (i = 0; i < n_blocks; i++) out[i] = bits_f32(le32(buf + 4 * i));
        return;
    case RS_TYPE_F16:
        for (i = 0; i < n_blocks; i++) out[i] = rs_f16_to_f32(le16(buf + 2 * i));
        return;
    case RS_TYPE_BF16:
        for (i = 0; i < n_blocks; i++) out[i] = bits_f32((uint32_t)le16(buf + 2 * i) << 16);
        return;
    default:
        break;
    }
    {
        uint32_t bb = rs_type_block_bytes(t);
        for (i = 0; i < n_blocks; i++, buf += bb, out += QK) {
            float d = rs_f16_to_f32(le16(buf));
            block_quants(t, buf, q);
            if (has_min(t)) {
                float m = rs_f16_to_f32(le16(buf + 2));
                for (j = 0; j < QK; j++) {
                    float w = (float)q[j] * d;            /* two roundings, as ggml */
                    out[j] = w + m;
                }
            } else {
                for (j = 0; j < QK; j++) out[j] = (float)q[j] * d;
            }
        }
    }
}

/* -- the activation --------------------------------------------------------------------------- */
void rs_prepare(uint32_t t, const float *x, uint32_t n, float *xf, int8_t *xq, float *xd,
                float *xs) {
    uint32_t i, b, j;
    if (t == RS_TYPE_F32) {
        for (i = 0; i < n; i++) xf[i] = x[i];
        return;
    }
    if (t == RS_TYPE_F16) {
        for (i = 0; i < n; i++) xf[i] = f16_round(x[i]);
        return;
    }
    if (t == RS_TYPE_BF16) {
        for (i = 0; i < n; i++) xf[i] = bf16_round(x[i]);
        return;
    }
    /* ggml's AVX2 quantize_row_q8_0 / quantize_row_q8_1, one 32-block at a time */
    for (b = 0; b < n / QK; b++) {
        const float *xb = x + b * QK;
        float amax = 0.0f, d, inv;
        int64_t s = 0;
        for (j = 0; j < QK; j++) {
            float a = fabsf(xb[j]);
            if (a > amax) amax = a;
        }
        d = amax / 127.0f;
        inv = amax != 0.0f ? 127.0f / amax : 0.0f;
        xd[b] = f16_round(d);
        for (j = 0; j < QK; j++) {
            float r = rintf(xb[j] * inv);                  /* _mm256_round_ps: half to even */
            int64_t v = (r >= -2147483648.0f && r < 2147483648.0f) ? (int64_t)r
                                                                     : (int64_t)INT32_MIN;
            s += v;
            xq[b * QK + j] = (int8_t)(v < -128 ? -128 : v > 127 ? 127 : v);
        }
        if (has_min(t)) {
            int32_t s32 = (int32_t)(uint32_t)(uint64_t)s;    /* int32 sum (wraps) */
            xs[b] = f16_round(d * (float)s32);
        }
    }
}

/* -- the dot ---------------------------------------------------------------------------------- */
/* GGML_F32x8_REDUCE of 4 accumulators x 8 lanes: (acc0+acc2) + (acc1+acc3), then
 * lo128 + hi128, then two horizontal adds. */
static float f32x8_reduce(const float *l) {
    float x[8], t[4];
    int i;
    for (i = 0; i < 8; i++) x[i] = (l[i] + l[16 + i]) + (l[8 + i] + l[24 + i]);
    for (i = 0; i < 4; i++) t[i] = x[i] + x[4 + i];
    return (t[0] + t[1]) + (t[2] + t[3]);
}

/* ggml's hsum_float_8 */
static float hsum_float_8(const float *v) {
    return ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]));
}

static float element(uint32_t t, const uint8_t *p) {
    if (t == RS_TYPE_F32) return bits_f32(le32(p));
    if (t == RS_TYPE_F16) return rs_f16_to_f32(le16(p));
    return bits_f32((uint32_t)le16(p) << 16);
}

void rs_matvec_blocks(uint32_t t, const uint8_t *buf, uint32_t n_blocks, uint32_t first_block,
                      uint32_t bpr, const float *xf, const int8_t *xq, const float *xd,
                      const float *xs, float *out, rs_lanes *st) {
    uint32_t bb = rs_type_block_bytes(t);
    uint32_t row = first_block / bpr, c = first_block - row * bpr;
    uint32_t k;
    if (rs_type_block_size(t) == 1) {
        uint32_t n_left = bpr & ~31u;          /* the columns ggml's SIMD loop covers */
        for (k = 0; k < n_blocks; k++, buf += bb) {
            float w = element(t, buf);
            if (t == RS_TYPE_BF16) {           /* float mode: left to right into out[row] */
                if (c == 0) out[row] = 0.0f;
                out[row] += w * xf[c];
            } else {
                if (c == 0) memset(st, 0, sizeof *st);
                if (c < n_left) {
                    st->lane[c % 32] = fmaf(w, xf[c], st->lane[c % 32]);
                } else {                       /* ggml's "leftovers" */
                    if (c == n_left) {
                        st->tail32 = f32x8_reduce(st->lane);
                        st->tail64 = (double)st->tail32;
                    }
                    if (t == RS_TYPE_F32) st->tail32 = fmaf(w, xf[c], st->tail32);
                    else st->tail64 += (double)(w * xf[c]);
                }
                if (c + 1 == bpr) {
                    float total = n_left == bpr ? f32x8_reduce(st->lane)
                                  : t == RS_TYPE_F32 ? st->tail32 : (float)st->tail64;
                    out[row] = 0.0f + total;
                }
            }
            if (++c == bpr) {
                c = 0;
                row++;
            }
        }
        return;
    }
    {
        int32_t q[QK];
        int min = has_min(t);
        for (k = 0; k < n_blocks; k++, buf += bb) {
            const int8_t *x = xq + (size_t)c * QK;
            float d = rs_f16_to_f32(le16(buf)) * xd[c];
            int i;
            if (c == 0) memset(st, 0, sizeof *st);
            block_quants(t, buf, q);
            for (i = 0; i < 8; i++) {
                int32_t lane = q[4 * i] * x[4 * i] + q[4 * i + 1] * x[4 * i + 1]
                               + q[4 * i + 2] * x[4 * i + 2] + q[4 * i + 3] * x[4 * i + 3];
                st->lane[i] = fmaf(d, (float)lane, st->lane[i]);
            }
            if (min) {
                float ms = rs_f16_to_f32(le16(buf + 2)) * xs[c];
                st->summs = st->summs + ms;
            }
            if (++c == bpr) {
                float total = hsum_float_8(st->lane);
                if (min) total += st->summs;
                out[row] = 0.0f + total;
                c = 0;
                row++;
            }
        }
    }
}
