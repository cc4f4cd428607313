/* rs_forward.c -- the RWKV forward pass of one token, reading the weights in stream order
 * (firmware_sim/forward.py in serial mode; rwkv_spec.md section 4). Each function consumes
 * exactly the records its block owns, in forward order, and works only in arena buffers.
 * Per layer, the state is rwkv.cpp's:
 *     v4:          [ffn_xx (C), att_xx (C), aa (C), bb (C), pp (C)]
 *     v5, v6, v7:  [ffn_xx (C), att_xx (C), wkv (H, S, S)]  (v5/v6 [h][key][value], v7 [h][value][key])
 */
#include <string.h>

#include "rs_internal.h"
#include "rs_ops.h"
#include "stream_format.h"

#define V7_DECAY_SCALE 0.606531f      /* rwkv.cpp's constant, about exp(-0.5) */

/* prev = the slot (the previous token's normed input); the slot then holds xn */
static void shift(float *slot, const float *xn, float *prev, uint32_t C) {
    memcpy(prev, slot, C * sizeof(float));
    memcpy(slot, xn, C * sizeof(float));
}

static void sub_in_place(float *a, const float *b, uint32_t n) {
    uint32_t i;
    for (i = 0; i < n; i++) a[i] -= b[i];
}

static void mul_in_place(float *a, const float *b, uint32_t n) {
    uint32_t i;
    for (i = 0; i < n; i++) a[i] *= b[i];
}

static void add_in_place(float *a, const float *b, uint32_t n) {
    uint32_t i;
    for (i = 0; i < n; i++) a[i] += b[i];
}

/* xn = LN(x; the next two records) -- the block's input, which token shift also carries */
static int norm_input(rs_board *b) {
    uint32_t C = b->hp.n_embd;
    RS_TRY(rs_vector(b, b->par, C));
    RS_TRY(rs_vector(b, b->par + C, C));
    rs_layer_norm(b->x, b->par, b->par + C, b->hp.ln_eps, b->xn, C);
    return RS_OK;
}

/* x += W_out y */
static int residual(rs_board *b, const float *y, uint32_t cols) {
    RS_TRY(rs_matvec(b, y, cols, b->tmp, b->hp.n_embd));
    add_in_place(b->x, b->tmp, b->hp.n_embd);
    return RS_OK;
}

/* x += sigmoid(Wr xr) * (Wv relu^2(Wk xk))   (v4, v5, v6) */
static int gated_ffn(rs_board *b, const float *xk, const float *xr) {
    uint32_t C = b->hp.n_embd, F = b->hp.ffn_size;
    float *r = b->proj;
    RS_TRY(rs_matvec(b, xr, C, r, C));
    rs_sigmoid(r, r, C);
    RS_TRY(rs_matvec(b, xk, C, b->hidden, F));
    rs_relu_squared(b->hidden, F);
    RS_TRY(rs_matvec(b, b->hidden, F, b->tmp, C));
    mul_in_place(b->tmp, r, C);
    add_in_place(b->x, b->tmp, C);
    return RS_OK;
}

/* -- RWKV-4 ----------------------------------------------------------------------------------- */
static int time_mix_v4(rs_board *b, float *st) {
    uint32_t C = b->hp.n_embd, n;
    float *par = b->par, *mix = b->mix;
    float *r = b->proj, *k = b->proj + C, *v = b->proj + 2 * C, *y = b->proj + 7 * C;
    RS_TRY(norm_input(b));
    shift(st + C, b->xn, b->delta, C);
    for (n = 0; n < 3; n++) {                      /* mix[0..2] = xk, xv, xr */
        RS_TRY(rs_vector(b, par + (2 + n) * C, C));
        rs_token_shift_mix(b->xn, b->delta, par + (2 + n) * C, mix + n * C, C);
    }
    RS_TRY(rs_matvec(b, mix + 2 * C, C, r, C));
    rs_sigmoid(r, r, C);
    RS_TRY(rs_matvec(b, mix, C, k, C));
    RS_TRY(rs_matvec(b, mix + C, C, v, C));
    RS_TRY(rs_vector(b, par + 5 * C, C));          /* u = time_first */
    RS_TRY(rs_vector(b, par + 6 * C, C));          /* w = time_decay, stored as -exp(decay) */
    rs_wkv_v4(k, v, par + 5 * C, par + 6 * C, st + 2 * C, st + 3 * C, st + 4 * C, y, C);
    mul_in_place(y, r, C);
    return residual(b, y, C);
}

/* v4 and v5: token shift by mixing, then the receptance-gated FFN */
static int channel_mix_v4(rs_board *b, float *st) {
    uint32_t C = b->hp.n_embd;
    RS_TRY(norm_input(b));
    shift(st, b->xn, b->delta, C);
    RS_TRY(rs_vector(b, b->par + 2 * C, C));
    rs_token_shift_mix(b->xn, b->delta, b->par + 2 * C, b->mix, C);
    RS_TRY(rs_vector(b, b->par + 3 * C, C));
    rs_token_shift_mix(b->xn, b->delta, b->par + 3 * C, b->mix + C, C);
    return gated_ffn(b, b->mix, b->mix + C);
}

/* -- RWKV-5.1 / 5.2 --------------------------------------------------------------------------- */
/* row[h*S .. h*S+S) = row[h] (the H per-head values read into the row's first entries) */
static void per_head(float *row, uint32_t H, uint32_t S) {
    uint32_t h = H, j;
    while (h--) {
        float value = row[h];
        for (j = 0; j < S; j++) row[h * S + j] = value;
    }
}

static int time_mix_v5(rs_board *b, float *st) {
    uint32_t C = b->hp.n_embd, H = b->hp.n_head, S = b->hp.head_size, n, n0;
    int v52 = b->arch == RS_ARCH_V5_2;
    float *par = b->par, *mix = b->mix;
    float *r = b->proj, *k = b->proj + C, *v = b->proj + 2 * C, *g = b->proj + 3 * C;
    float *y = b->proj + 7 * C, *u, *w;
    RS_TRY(norm_input(b));
    shift(st + C, b->xn, b->delta, C);
    for (n = 0; n < (v52 ? 4u : 3u); n++) {        /* mix[n] = xk, xv, xr, (xg) */
        RS_TRY(rs_vector(b, par + (2 + n) * C, C));
        rs_token_shift_mix(b->xn, b->delta, par + (2 + n) * C, mix + n * C, C);
    }
    RS_TRY(rs_matvec(b, mix + 2 * C, C, r, C));    /* no sigmoid in v5 */
    RS_TRY(rs_matvec(b, mix, C, k, C));
    RS_TRY(rs_matvec(b, mix + C, C, v, C));
    if (v52) {
        RS_TRY(rs_matvec(b, mix + 3 * C, C, b->tmp, C));
        rs_silu(b->tmp, g, C);
        u = par + 6 * C;
        w = par + 7 * C;                           /* stored as exp(-exp(decay)) */
        RS_TRY(rs_vector(b, u, C));
        RS_TRY(rs_vector(b, w, C));
    } else {                                       /* one u and one w per head */
        u = par + 5 * C;
        w = par + 6 * C;
        RS_TRY(rs_vector(b, u, H));
        per_head(u, H, S);
        RS_TRY(rs_vector(b, w, H));
        per_head(w, H, S);
    }
    rs_wkv_v5(r, k, v, u, w, st + 2 * C, y, H, S);
    n0 = v52 ? 8 : 7;
    RS_TRY(rs_vector(b, par + n0 * C, C));
    RS_TRY(rs_vector(b, par + (n0 + 1) * C, C));
    rs_group_norm(y, par + n0 * C, par + (n0 + 1) * C, H, b->hp.gn_eps, y, C);
    if (v52) mul_in_place(y, g, C);
    return residual(b, y, C);
}

/* -- RWKV-6 ----------------------------------------------------------------------------------- */
static int time_mix_v6(rs_board *b, float *st) {
    uint32_t C = b->hp.n_embd, H = b->hp.n_head, S = b->hp.head_size, D = b->hp.lora_maa;
    uint32_t Dw = b->hp.lora_decay, n, i;
    float *par = b->par, *mix = b->mix, *lora = b->lora, *delta = b->delta, *xn = b->xn;
    float *r = b->proj, *k = b->proj + C, *v = b->proj + 2 * C, *g = b->proj + 3 * C;
    float *w = b->proj + 4 * C, *y = b->proj + 7 * C;
    const float *xs[5];
    float *outs[5];
    RS_TRY(norm_input(b));
    shift(st + C, xn, delta, C);
    sub_in_place(delta, xn, C);                    /* sx = prev - x */
    RS_TRY(rs_vector(b, par + 2 * C, C));
    rs_shift_lerp(xn, delta, par + 2 * C, b->tmp, C);          /* xxx */
    RS_TRY(rs_matvec(b, b->tmp, C, lora, 5 * D));
    rs_tanh_vec(lora, 5 * D);
    for (n = 0; n < 5; n++) {
        xs[n] = lora + n * D;
        outs[n] = mix + n * C;
    }
    RS_TRY(rs_matvec_parts(b, xs, D, outs, C, 5));
    for (n = 0; n < 5; n++) {                      /* mix[n] = xw, xk, xv, xr, xg */
        float *m = mix + n * C, *maa = par + (3 + n) * C;
        RS_TRY(rs_vector(b, maa, C));
        for (i = 0; i < C; i++) {
            float t = m[i] + maa[i];
            m[i] = delta[i] * t + xn[i];
        }
    }
    RS_TRY(rs_matvec(b, mix + 3 * C, C, r, C));
    RS_TRY(rs_matvec(b, mix + C, C, k, C));
    RS_TRY(rs_matvec(b, mix + 2 * C, C, v, C));
    RS_TRY(rs_matvec(b, mix + 4 * C, C, b->tmp, C));
    rs_silu(b->tmp, g, C);
    RS_TRY(rs_vector(b, par + 8 * C, C));          /* time_decay */
    RS_TRY(rs_matvec(b, mix, C, lora, Dw));
    rs_tanh_vec(lora, Dw);
    RS_TRY(rs_matvec(b, lora, Dw, w, C));
    add_in_place(w, par + 8 * C, C);
    for (i = 0; i < C; i++) w[i] = rs_exp(-rs_exp(w[i]));      /* exp(-exp(decay + lora)) */
    RS_TRY(rs_vector(b, par + 9 * C, C));          /* u = time_faaaa */
    rs_wkv_v5(r, k, v, par + 9 * C, w, st + 2 * C, y, H, S);
    RS_TRY(rs_vector(b, par + 10 * C, C));
    RS_TRY(rs_vector(b, par + 11 * C, C));
    rs_group_norm(y, par + 10 * C, par + 11 * C, H, b->hp.gn_eps, y, C);
    mul_in_place(y, g, C);
    return residual(b, y, C);
}

/* v6: token shift by lerp, then the receptance-gated FFN */
static int channel_mix_v6(rs_board *b, float *st) {
    uint32_t C = b->hp.n_embd;
    RS_TRY(norm_input(b));
    shift(st, b->xn, b->delta, C);
    sub_in_place(b->delta, b->xn, C);
    RS_TRY(rs_vector(b, b->par + 2 * C, C));
    rs_shift_lerp(b->xn, b->delta, b->par + 2 * C, b->mix, C);
    RS_TRY(rs_vector(b, b->par + 3 * C, C));
    rs_shift_lerp(b->xn, b->delta, b->par + 3 * C, b->mix + C, C);
    return gated_ffn(b, b->mix, b->mix + C);
}

/* -- RWKV-7 ----------------------------------------------------------------------------------- */
static int time_mix_v7(rs_board *b, float *st, uint32_t layer) {
    const rs_hparams *hp = &b->hp;
    uint32_t C = hp->n_embd, H = hp->n_head, S = hp->head_size, n, i, h;
    float *par = b->par, *mix = b->mix, *lora = b->lora, *tmp = b->tmp, *xn = b->xn;
    float *r = b->proj, *k = b->proj + C, *v = b->proj + 2 * C, *g = b->proj + 3 * C;
    float *w = b->proj + 4 * C, *aa = b->proj + 5 * C, *kk = b->proj + 6 * C;
    float *y = b->proj + 7 * C;
    float *xr = mix, *xw = mix + C, *xk = mix + 2 * C, *xv = mix + 3 * C, *xa = mix + 4 * C;
    float *xg = mix + 5 * C;
    float *k_a, *r_k;
    RS_TRY(norm_input(b));
    shift(st + C, xn, b->delta, C);
    sub_in_place(b->delta, xn, C);
    RS_TRY(rs_vector(b, par + 2 * C, 6 * C));      /* x_rwkvag */
    for (n = 0; n < 6; n++) rs_shift_lerp(xn, b->delta, par + (2 + n) * C, mix + n * C, C);
    RS_TRY(rs_matvec(b, xr, C, r, C));
    RS_TRY(rs_vector(b, par + 8 * C, C));          /* w0 */
    RS_TRY(rs_matvec(b, xw, C, lora, hp->lora_w));
    rs_tanh_vec(lora, hp->lora_w);
    RS_TRY(rs_matvec(b, lora, hp->lora_w, w, C));
    add_in_place(w, par + 8 * C, C);
    rs_sigmoid(w, w, C);
    for (i = 0; i < C; i++) w[i] *= -V7_DECAY_SCALE;
    rs_exp_vec(w, C);                              /* w = exp(-0.606531 sigmoid(.)) */
    RS_TRY(rs_matvec(b, xk, C, k, C));
    RS_TRY(rs_matvec(b, xv, C, v, C));
    if (layer == 0) {
        memcpy(b->v_first, v, C * sizeof(float));
    } else {                                       /* value residual */
        RS_TRY(rs_vector(b, par + 9 * C, C));      /* v0 */
        RS_TRY(rs_matvec(b, xv, C, lora, hp->lora_v));
        RS_TRY(rs_matvec(b, lora, hp->lora_v, tmp, C));
        add_in_place(tmp, par + 9 * C, C);
        rs_sigmoid(tmp, tmp, C);
        for (i = 0; i < C; i++) v[i] += (b->v_first[i] - v[i]) * tmp[i];
    }
    RS_TRY(rs_vector(b, par + 10 * C, C));         /* a0 */
    RS_TRY(rs_matvec(b, xa, C, lora, hp->lora_a));
    RS_TRY(rs_matvec(b, lora, hp->lora_a, aa, C));
    add_in_place(aa, par + 10 * C, C);
    rs_sigmoid(aa, aa, C);                         /* in-context learning rate */
    RS_TRY(rs_matvec(b, xg, C, lora, hp->lora_g));
    rs_sigmoid(lora, lora, hp->lora_g);
    RS_TRY(rs_matvec(b, lora, hp->lora_g, g, C));
    RS_TRY(rs_vector(b, par + 11 * C, C));         /* k_k */
    for (i = 0; i < C; i++) tmp[i] = k[i] * par[11 * C + i];
    rs_l2_normalize_heads(tmp, H, S, kk);          /* kk from the unmodified k */
    k_a = par + 12 * C;
    RS_TRY(rs_vector(b, k_a, C));
    for (i = 0; i < C; i++) {
        float kka = k[i] * k_a[i];
        k[i] += aa[i] * kka - k[i] * k_a[i];
    }
    r_k = par + 13 * C;
    RS_TRY(rs_vector(b, r_k, C));
    for (i = 0; i < C; i++) {                      /* alpha = -kk, beta = kk * aa */
        xr[i] = -kk[i];
        xw[i] = kk[i] * aa[i];
    }
    rs_wkv_v7(r, w, k, v, xr, xw, st + 2 * C, y, tmp, H, S);
    RS_TRY(rs_vector(b, par + 14 * C, C));
    RS_TRY(rs_vector(b, par + 15 * C, C));
    rs_group_norm(y, par + 14 * C, par + 15 * C, H, hp->gn_eps, y, C);
    for (i = 0; i < C; i++) xk[i] = (r[i] * k[i]) * r_k[i];
    for (h = 0; h < H; h++) {                      /* bonus: y += v * sum_head(r k r_k) */
        float bonus = rs_sum32(xk + h * S, S);
        for (i = 0; i < S; i++) y[h * S + i] += v[h * S + i] * bonus;
    }
    mul_in_place(y, g, C);
    return residual(b, y, C);
}

static int channel_mix_v7(rs_board *b, float *st) {
    uint32_t C = b->hp.n_embd, F = b->hp.ffn_size;
    RS_TRY(norm_input(b));
    shift(st, b->xn, b->delta, C);
    sub_in_place(b->delta, b->xn, C);
    RS_TRY(rs_vector(b, b->par + 2 * C, C));       /* x_k */
    rs_shift_lerp(b->xn, b->delta, b->par + 2 * C, b->mix, C);
    RS_TRY(rs_matvec(b, b->mix, C, b->hidden, F));
    rs_relu_squared(b->hidden, F);
    return residual(b, b->hidden, F);
}

/* -- the pass --------------------------------------------------------------------------------- */
int rs_forward(rs_board *b, uint32_t token) {
    const rs_hparams *hp = &b->hp;
    uint32_t C = hp->n_embd, i;
    size_t per_layer = b->state_bytes / sizeof(float) / hp->n_layer;
    RS_TRY(rs_read_embedding(b, token, b->x));    /* x = emb[token] */
    RS_TRY(rs_vector(b, b->par, C));
    RS_TRY(rs_vector(b, b->par + C, C));
    rs_layer_norm(b->x, b->par, b->par + C, hp->ln_eps, b->x, C);
    for (i = 0; i < hp->n_layer; i++) {
        float *st = b->state + per_layer * i;
        switch (b->arch) {
        case RS_ARCH_V4:
            RS_TRY(time_mix_v4(b, st));
            RS_TRY(channel_mix_v4(b, st));
            break;
        case RS_ARCH_V5_1:
        case RS_ARCH_V5_2:
            RS_TRY(time_mix_v5(b, st));
            RS_TRY(channel_mix_v4(b, st));
            break;
        case RS_ARCH_V6:
            RS_TRY(time_mix_v6(b, st));
            RS_TRY(channel_mix_v6(b, st));
            break;
        default:
            RS_TRY(time_mix_v7(b, st, i));
            RS_TRY(channel_mix_v7(b, st));
            break;
        }
    }
    RS_TRY(rs_vector(b, b->par, C));
    RS_TRY(rs_vector(b, b->par + C, C));
    rs_layer_norm(b->x, b->par, b->par + C, hp->ln_eps, b->xn, C);
    RS_TRY(rs_matvec(b, b->xn, C, b->logits, hp->n_vocab));     /* logits = head @ LN(x) */
    return rs_check_end(b);
}
