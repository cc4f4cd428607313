/* rwkv_board.c -- the stream reader and the board's life cycle: header, type table, arena,
 * records front to back with their CRCs (firmware_sim/board.py, docs/format.md). */
#include <string.h>

#include "rs_internal.h"
#include "rs_kernels.h"
#include "stream_format.h"

/* -- CRC-32 (zlib's), a nibble at a time: 64 bytes of table ----------------------------------- */
static const uint32_t crc_nibble[16] = {
    0x00000000u, 0x1DB71064u, 0x3B6E20C8u, 0x26D930ACu, 0x76DC4190u, 0x6B6B51F4u,
    0x4DB26158u, 0x5005713Cu, 0xEDB88320u, 0xF00F9344u, 0xD6D6A3E8u, 0xCB61B38Cu,
    0x9B64C2B0u, 0x86D3D2D4u, 0xA00AE278u, 0xBDBDF21Cu};

static uint32_t crc32_update(uint32_t crc, const uint8_t *p, uint32_t n) {
    crc = ~crc;
    while (n--) {
        crc ^= *p++;
        crc = (crc >> 4) ^ crc_nibble[crc & 15u];
        crc = (crc >> 4) ^ crc_nibble[crc & 15u];
    }
    return ~crc;
}

static uint16_t le16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }
static uint32_t le32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static uint32_t pad16(uint32_t x) { return (0u - x) & 15u; }

/* -- errors ----------------------------------------------------------------------------------- */
const char *rs_errname(int code) {
    switch (code) {
    case RS_OK: return "RS_OK";
    case RS_ERR_IO: return "RS_ERR_IO";
    case RS_ERR_FORMAT: return "RS_ERR_FORMAT";
    case RS_ERR_TYPE: return "RS_ERR_TYPE";
    case RS_ERR_NO_RAM: return "RS_ERR_NO_RAM";
    case RS_ERR_MAGIC: return "RS_ERR_MAGIC";
    case RS_ERR_VERSION: return "RS_ERR_VERSION";
    case RS_ERR_HEADER_CRC: return "RS_ERR_HEADER_CRC";
    case RS_ERR_ARCH: return "RS_ERR_ARCH";
    case RS_ERR_RECORD_CRC: return "RS_ERR_RECORD_CRC";
    case RS_ERR_PAYLOAD_CRC: return "RS_ERR_PAYLOAD_CRC";
    case RS_ERR_KIND: return "RS_ERR_KIND";
    case RS_ERR_CHUNK: return "RS_ERR_CHUNK";
    case RS_ERR_TOKEN: return "RS_ERR_TOKEN";
    case RS_ERR_ARG: return "RS_ERR_ARG";
    case RS_ERR_FAILED: return "RS_ERR_FAILED";
    default: return "RS_ERR_?";
    }
}

const char *rs_strerror(int code) {
    switch (code) {
    case RS_OK: return "ok";
    case RS_ERR_IO: return "the stream source failed to deliver bytes";
    case RS_ERR_FORMAT: return "the stream does not follow the format (a field or record is wrong)";
    case RS_ERR_TYPE: return "the stream uses a tensor type this board does not implement";
    case RS_ERR_NO_RAM: return "the arena is too small for this model (see arena_needed)";
    case RS_ERR_MAGIC: return "not an rwkv-stream (magic is not RWKS)";
    case RS_ERR_VERSION: return "stream format major version is not the one this board reads";
    case RS_ERR_HEADER_CRC: return "stream header CRC-32 mismatch";
    case RS_ERR_ARCH: return "unknown RWKV architecture";
    case RS_ERR_RECORD_CRC: return "record header CRC-32 mismatch";
    case RS_ERR_PAYLOAD_CRC: return "record payload CRC-32 mismatch";
    case RS_ERR_KIND: return "unknown required record kind";
    case RS_ERR_CHUNK: return "chunk buffer smaller than a record header or a block";
    case RS_ERR_TOKEN: return "token outside the vocabulary";
    case RS_ERR_ARG: return "bad argument";
    case RS_ERR_FAILED: return "the board failed earlier; initialize it again";
    default: return "unknown error";
    }
}

/* -- tensor order and shapes (docs/format.md section 8) --------------------------------------- */
enum { Z1, ZC, ZF, ZH, ZS, ZV, ZD, Z5D, ZDW, ZRW, ZRA, ZRV, ZRG, Z5, Z6 };
typedef struct { uint8_t ndim, d[3]; } shape;

#define VEC {1, {ZC, Z1, Z1}}
#define CC {2, {ZC, ZC, Z1}}
#define FC {2, {ZF, ZC, Z1}}
#define CF {2, {ZC, ZF, Z1}}
#define C3 {3, {Z1, Z1, ZC}}
#define HS1 {3, {ZH, ZS, Z1}}
#define L_IN(r) {2, {r, ZC, Z1}}
#define L_OUT(r) {2, {ZC, r, Z1}}

static const shape v4_layer[18] = {VEC, VEC, VEC, VEC, VEC, CC, CC, CC, VEC, VEC, CC,
                                   VEC, VEC, VEC, VEC, CC, FC, CF};
static const shape v51_layer[20] = {VEC, VEC, VEC, VEC, VEC, CC, CC, CC, {3, {ZH, Z1, Z1}},
                                    {3, {ZH, Z1, Z1}}, VEC, VEC, CC,
                                    VEC, VEC, VEC, VEC, CC, FC, CF};
static const shape v52_layer[22] = {VEC, VEC, VEC, VEC, VEC, VEC, CC, CC, CC, CC, HS1, HS1,
                                    VEC, VEC, CC, VEC, VEC, VEC, VEC, CC, FC, CF};
static const shape v6_layer[28] = {VEC, VEC, VEC, L_IN(Z5D), {3, {Z5, ZC, ZD}}, VEC, VEC, VEC,
                                   VEC, VEC, CC, CC, CC, CC, HS1, L_IN(ZDW), L_OUT(ZDW), HS1,
                                   VEC, VEC, CC, VEC, VEC, VEC, VEC, CC, FC, CF};
static const shape v7_layer[28] = {VEC, VEC, {3, {Z6, Z1, ZC}}, CC, C3, L_IN(ZRW), L_OUT(ZRW),
                                   CC, CC, C3, L_IN(ZRV), L_OUT(ZRV), C3, L_IN(ZRA),
                                   L_OUT(ZRA), L_IN(ZRG), L_OUT(ZRG), C3, C3, {2, {ZH, ZS, Z1}},
                                   VEC, VEC, CC, VEC, VEC, C3, FC, CF};

static const shape *layer_shapes(uint32_t arch, uint32_t *n) {
    switch (arch) {
    case RS_ARCH_V4: *n = 18; return v4_layer;
    case RS_ARCH_V5_1: *n = 20; return v51_layer;
    case RS_ARCH_V5_2: *n = 22; return v52_layer;
    case RS_ARCH_V6: *n = 28; return v6_layer;
    case RS_ARCH_V7: *n = 28; return v7_layer;
    default: *n = 0; return NULL;
    }
}

uint32_t rs_layer_tensors(uint32_t arch, uint32_t layer) {
    uint32_t n;
    layer_shapes(arch, &n);
    return arch == RS_ARCH_V7 && layer == 0 ? n - 3 : n;
}

uint32_t rs_expected_tensors(uint32_t arch, uint32_t n_layer) {
    uint32_t n;
    if (!layer_shapes(arch, &n) || n_layer == 0) return 0;
    return 6 + n_layer * n - (arch == RS_ARCH_V7 ? 3 : 0);
}

static uint32_t sym(const rs_board *b, uint8_t s) {
    const rs_hparams *h = &b->hp;
    switch (s) {
    case ZC: return h->n_embd;
    case ZF: return h->ffn_size;
    case ZH: return h->n_head;
    case ZS: return h->head_size;
    case ZV: return h->n_vocab;
    case ZD: return h->lora_maa;
    case Z5D: return 5 * h->lora_maa;
    case ZDW: return h->lora_decay;
    case ZRW: return h->lora_w;
    case ZRA: return h->lora_a;
    case ZRV: return h->lora_v;
    case ZRG: return h->lora_g;
    case Z5: return 5;
    case Z6: return 6;
    default: return 1;
    }
}

/* the expected (ndim, dims) of tensor `index` in forward order */
static void tensor_shape(const rs_board *b, uint32_t index, uint32_t *ndim, uint32_t *dims) {
    static const shape emb = {2, {ZV, ZC, Z1}}, vec = VEC;
    const shape *s = &vec;
    uint32_t n_per, i = index;
    const shape *layer = layer_shapes(b->arch, &n_per);
    if (index == 0 || index == b->hp.n_tensors - 1) {
        s = &emb;
    } else if (index >= 3 && index < b->hp.n_tensors - 3) {
        uint32_t l = 0;
        i -= 3;
        while (i >= rs_layer_tensors(b->arch, l)) i -= rs_layer_tensors(b->arch, l++);
        if (b->arch == RS_ARCH_V7 && l == 0 && i >= 9) i += 3;      /* no v0, v1, v2 */
        s = &layer[i];
    }
    *ndim = s->ndim;
    dims[0] = sym(b, s->d[0]);
    dims[1] = sym(b, s->d[1]);
    dims[2] = sym(b, s->d[2]);
}

/* -- reading ---------------------------------------------------------------------------------- */
static int fail(rs_board *b, int rc, uint32_t offset) {
    b->fail_offset = offset;
    return rc;
}

static int rd(rs_board *b, uint32_t off, uint8_t *dst, uint32_t n) {
    if (n == 0) return RS_OK;
    if (b->body_size && (off > b->body_size || n > b->body_size - off))
        return fail(b, RS_ERR_FORMAT, off);                   /* past the END record */
    if (b->src->mapped) {
        memcpy(dst, b->src->mapped + off, n);
        return RS_OK;
    }
    if (!b->src->read || b->src->read(b->src->ctx, off, dst, n)) return fail(b, RS_ERR_IO, off);
    return RS_OK;
}

/* the next n bytes at b->pos: in place (XIP) or through the chunk buffer */
static int fetch(rs_board *b, uint32_t n, const uint8_t **p) {
    if (b->pos > b->body_size || n > b->body_size - b->pos) return fail(b, RS_ERR_FORMAT, b->pos);
    if (b->src->mapped) {
        *p = b->src->mapped + b->pos;
    } else {
        RS_TRY(rd(b, b->pos, b->chunk, n));
        *p = b->chunk;
    }
    if (b->verifying) b->crc = crc32_update(b->crc, *p, n);
    b->pos += n;
    return RS_OK;
}

/* Check the record header `h` at `off` is tensor `index` as section 8 says; sets rec_*. */
static int check_record(rs_board *b, const uint8_t *h, uint32_t off, uint32_t index) {
    uint32_t kind = le16(h), ndim, dims[3], i, bs, bb;
    uint64_t rows = 1;
    uint32_t type = h[RS_REC_OFF_TYPE];
    b->fail_tensor = (int)index;
    if (crc32_update(0, h, RS_REC_OFF_HEADER_CRC) != le32(h + RS_REC_OFF_HEADER_CRC))
        return fail(b, RS_ERR_RECORD_CRC, off);
    if (kind != RS_KIND_TENSOR)
        return fail(b, kind == RS_KIND_END ? RS_ERR_FORMAT : RS_ERR_KIND, off);
    if (le16(h + RS_REC_OFF_TENSOR) != index) return fail(b, RS_ERR_FORMAT, off);
    if (type >= 32 || !(b->type_mask >> type & 1u)) return fail(b, RS_ERR_TYPE, off);
    tensor_shape(b, index, &ndim, dims);
    if (h[RS_REC_OFF_NDIM] != ndim) return fail(b, RS_ERR_FORMAT, off);
    for (i = 0; i < ndim; i++)
        if (le32(h + RS_REC_OFF_DIMS + 4 * i) != dims[i]) return fail(b, RS_ERR_FORMAT, off);
    for (i = 0; i + 1 < ndim; i++) rows *= dims[i];
    bs = rs_type_block_size(type);
    bb = rs_type_block_bytes(type);
    if (dims[ndim - 1] % bs
        || le32(h + RS_REC_OFF_DATA_SIZE) != (uint64_t)rows * (dims[ndim - 1] / bs) * bb
        || (uint64_t)off + RS_RECORD_HEADER_SIZE + le32(h + RS_REC_OFF_DATA_SIZE)
               + RS_RECORD_CRC_SIZE > b->body_size)
        return fail(b, RS_ERR_FORMAT, off);
    b->rec_offset = off;
    b->rec_size = le32(h + RS_REC_OFF_DATA_SIZE);
    b->rec_type = (uint8_t)type;
    b->rec_rows = (uint32_t)rows;
    b->rec_cols = dims[ndim - 1];
    b->rec_n = (uint32_t)rows * dims[ndim - 1];
    b->fail_tensor = -1;
    return RS_OK;
}

/* The next tensor's record header (optional records skipped); the payload follows at b->pos. */
static int begin(rs_board *b) {
    uint8_t h[RS_RECORD_HEADER_SIZE];
    uint32_t off;
    for (;;) {
        off = b->pos;
        RS_TRY(rd(b, off, h, RS_RECORD_HEADER_SIZE));
        if (le16(h) < RS_KIND_OPTIONAL_MIN) break;
        if (crc32_update(0, h, RS_REC_OFF_HEADER_CRC) != le32(h + RS_REC_OFF_HEADER_CRC))
            return fail(b, RS_ERR_RECORD_CRC, off);
        {   /* an optional record: skip it by its length */
            uint64_t end = (uint64_t)off + RS_RECORD_HEADER_SIZE
                           + le32(h + RS_REC_OFF_DATA_SIZE) + RS_RECORD_CRC_SIZE;
            if (end > b->body_size) return fail(b, RS_ERR_FORMAT, off);
            b->pos = (uint32_t)end + pad16((uint32_t)end);
        }
    }
    RS_TRY(check_record(b, h, off, b->next));
    b->pos = off + RS_RECORD_HEADER_SIZE;
    b->crc = 0;
    /* each payload CRC is checked the first time a pass reads the record */
    b->verifying = !b->verified_all;
    if (b->verifying) {                     /* and its type against the plan, once */
        uint8_t planned;
        RS_TRY(rd(b, b->plan_offset + b->next, &planned, 1));
        if (planned != b->rec_type) {
            b->fail_tensor = (int)b->next;
            return fail(b, RS_ERR_FORMAT, off);
        }
    }
    b->next++;
    return RS_OK;
}

/* After the payload: its CRC and the padding. */
static int end_record(rs_board *b) {
    uint8_t tail[RS_RECORD_CRC_SIZE + 15];
    uint32_t end = b->rec_offset + RS_RECORD_HEADER_SIZE + b->rec_size + RS_RECORD_CRC_SIZE;
    uint32_t n = RS_RECORD_CRC_SIZE + pad16(end);
    RS_TRY(rd(b, end - RS_RECORD_CRC_SIZE, tail, n));
    if (b->verifying && le32(tail) != b->crc) {
        b->fail_tensor = (int)b->next - 1;
        return fail(b, RS_ERR_PAYLOAD_CRC, b->rec_offset + RS_RECORD_HEADER_SIZE);
    }
    b->pos = end + pad16(end);
    return RS_OK;
}

/* After the last tensor (first pass only): optional records, then END, ending at body_size. */
int rs_check_end(rs_board *b) {
    uint8_t h[RS_RECORD_HEADER_SIZE];
    uint32_t off;
    if (b->verified_all) return RS_OK;
    for (;;) {
        off = b->pos;
        RS_TRY(rd(b, off, h, RS_RECORD_HEADER_SIZE));
        if (crc32_update(0, h, RS_REC_OFF_HEADER_CRC) != le32(h + RS_REC_OFF_HEADER_CRC))
            return fail(b, RS_ERR_RECORD_CRC, off);
        if (le16(h) < RS_KIND_OPTIONAL_MIN) break;
        {
            uint64_t end = (uint64_t)off + RS_RECORD_HEADER_SIZE
                           + le32(h + RS_REC_OFF_DATA_SIZE) + RS_RECORD_CRC_SIZE;
            if (end > b->body_size) return fail(b, RS_ERR_FORMAT, off);
            b->pos = (uint32_t)end + pad16((uint32_t)end);
        }
    }
    b->fail_tensor = -1;
    if (le16(h) != RS_KIND_END)
        return fail(b, le16(h) == RS_KIND_TENSOR ? RS_ERR_FORMAT : RS_ERR_KIND, off);
    if (le32(h + RS_REC_OFF_DATA_SIZE) != 0
        || off + RS_RECORD_HEADER_SIZE + RS_RECORD_CRC_SIZE + 12 != b->body_size)
        return fail(b, RS_ERR_FORMAT, off);
    return RS_OK;
}

static uint32_t blocks_per_chunk(const rs_board *b, uint32_t bb) {
    return b->chunk_size / bb;
}

/* n_blocks blocks of the current record dequantized into out */
static int read_blocks(rs_board *b, uint32_t type, uint32_t n_blocks, float *out) {
    uint32_t bs = rs_type_block_size(type), bb = rs_type_block_bytes(type);
    uint32_t per = blocks_per_chunk(b, bb);
    while (n_blocks) {
        uint32_t nb = n_blocks < per ? n_blocks : per;
        const uint8_t *p;
        RS_TRY(fetch(b, nb * bb, &p));
        rs_dequantize(type, p, nb, out);
        out += nb * bs;
        n_blocks -= nb;
    }
    return RS_OK;
}

int rs_read_embedding(rs_board *b, uint32_t token, float *out) {
    uint32_t bs = rs_type_block_size(b->emb_type);
    int verifying = b->verifying;
    if (token >= b->hp.n_vocab) return RS_ERR_TOKEN;
    b->pos = b->emb_offset + token * b->emb_row_bytes;
    b->verifying = 0;                       /* its CRC was checked once, at init */
    RS_TRY(read_blocks(b, b->emb_type, b->hp.n_embd / bs, out));
    b->verifying = verifying;
    b->pos = b->after_embedding;
    b->next = 1;
    return RS_OK;
}

int rs_vector(rs_board *b, float *out, uint32_t n) {
    RS_TRY(begin(b));
    if (b->rec_n != n) return fail(b, RS_ERR_FORMAT, b->rec_offset);
    RS_TRY(read_blocks(b, b->rec_type, n / rs_type_block_size(b->rec_type), out));
    return end_record(b);
}

static int matvec_rows(rs_board *b, const float *x, uint32_t cols, float *out, uint32_t rows) {
    uint32_t type = b->rec_type, bs = rs_type_block_size(type), bb = rs_type_block_bytes(type);
    uint32_t bpr = cols / bs, total = rows * bpr, first = 0, per = blocks_per_chunk(b, bb);
    rs_prepare(type, x, cols, b->act_f, b->act_q, b->act_d, b->act_s);
    while (first < total) {
        uint32_t nb = total - first < per ? total - first : per;
        const uint8_t *p;
        RS_TRY(fetch(b, nb * bb, &p));
        rs_matvec_blocks(type, p, nb, first, bpr, b->act_f, b->act_q, b->act_d, b->act_s, out,
                         b->lanes);
        first += nb;
    }
    return RS_OK;
}

int rs_matvec(rs_board *b, const float *x, uint32_t cols, float *out, uint32_t rows) {
    RS_TRY(begin(b));
    if (b->rec_cols != cols || b->rec_rows != rows) return fail(b, RS_ERR_FORMAT, b->rec_offset);
    RS_TRY(matvec_rows(b, x, cols, out, rows));
    return end_record(b);
}

int rs_matvec_parts(rs_board *b, const float *const *x, uint32_t cols, float *const *out,
                    uint32_t rows, uint32_t parts) {
    uint32_t p;
    RS_TRY(begin(b));
    if (b->rec_cols != cols || b->rec_rows != rows * parts)
        return fail(b, RS_ERR_FORMAT, b->rec_offset);
    for (p = 0; p < parts; p++) RS_TRY(matvec_rows(b, x[p], cols, out[p], rows));
    return end_record(b);
}

/* -- the arena (firmware_sim/arena.py's buffer_plan, one column, logits kept) ----------------- */
uint32_t rs_param_rows(uint32_t arch) {
    switch (arch) {
    case RS_ARCH_V4: return 7;
    case RS_ARCH_V5_1: return 9;
    case RS_ARCH_V5_2: return 10;
    case RS_ARCH_V6: return 12;
    default: return 16;
    }
}

uint32_t rs_mix_rows(uint32_t arch) {
    switch (arch) {
    case RS_ARCH_V4: case RS_ARCH_V5_1: return 3;
    case RS_ARCH_V5_2: return 4;
    case RS_ARCH_V6: return 5;
    default: return 6;
    }
}

#define ROW_STATE_BYTES (40 * 8)     /* formats/kernels.py ROW_STATE_SIZE float64s */

static uint32_t lora_width(uint32_t arch, const rs_hparams *h) {
    uint32_t w = 0;
    if (arch == RS_ARCH_V6) {
        w = 5 * h->lora_maa;
        if (h->lora_decay > w) w = h->lora_decay;
    } else if (arch == RS_ARCH_V7) {
        w = h->lora_w;
        if (h->lora_a > w) w = h->lora_a;
        if (h->lora_v > w) w = h->lora_v;
        if (h->lora_g > w) w = h->lora_g;
    }
    return w;
}

static uint64_t state_floats(uint32_t arch, const rs_hparams *h) {
    uint64_t per = arch == RS_ARCH_V4 ? 5u * (uint64_t)h->n_embd
                                      : (2u + (uint64_t)h->head_size) * h->n_embd;
    return per * h->n_layer;
}

/* Walk the plan: with base == NULL only count. Returns the bytes needed. */
static size_t carve(rs_board *b, uint32_t arch, const rs_hparams *h, uint32_t chunk,
                    uint8_t *base) {
    uint64_t off = 0;
    uint32_t C = h->n_embd, F = h->ffn_size, lw = lora_width(arch, h);
    uint32_t n_act = C, blocks;
    if (F > n_act) n_act = F;
    if (lw > n_act) n_act = lw;
    blocks = (n_act + 31) / 32;
#define TAKE_BYTES(field, type, bytes)                                        \
    do {                                                                      \
        uint64_t nb_ = (uint64_t)(bytes);                                     \
        if (base) b->field = (type *)(void *)(base + (size_t)off);            \
        off += nb_ + ((0u - nb_) & 15u);                                      \
    } while (0)
#define TAKE(field, type, count) TAKE_BYTES(field, type, (uint64_t)(count) * sizeof(type))
    TAKE(header, uint8_t, RS_HEADER_FIXED_SIZE);
    TAKE(chunk, uint8_t, chunk);
    TAKE(x, float, C);
    TAKE(xn, float, C);
    TAKE(delta, float, C);
    TAKE(par, float, rs_param_rows(arch) * C);
    TAKE(mix, float, rs_mix_rows(arch) * C);
    TAKE(proj, float, 8 * C);
    TAKE(tmp, float, C);
    TAKE(hidden, float, F);
    TAKE(act_f, float, n_act);
    TAKE(act_q, int8_t, blocks * 32);
    TAKE(act_d, float, blocks);
    TAKE(act_s, float, blocks);
    TAKE_BYTES(lanes, rs_lanes, ROW_STATE_BYTES);
    if (lw) TAKE(lora, float, lw);
    if (arch == RS_ARCH_V7) TAKE(v_first, float, C);
    TAKE(state, float, state_floats(arch, h));
    TAKE(logits, float, h->n_vocab);
#undef TAKE
#undef TAKE_BYTES
    return off > (uint64_t)(size_t)-1 ? (size_t)-1 : (size_t)off;   /* never fits */
}

size_t rs_arena_bytes(uint32_t arch, const rs_hparams *hp, uint32_t chunk) {
    uint32_t n;
    if (!layer_shapes(arch, &n)) return 0;
    return carve(NULL, arch, hp, chunk, NULL);
}

/* -- header ----------------------------------------------------------------------------------- */
static int parse_header(rs_board *b) {
    uint8_t f[RS_HEADER_FIXED_SIZE], piece[RS_TYPE_ENTRY_SIZE];
    rs_hparams *h = &b->hp;
    uint32_t crc, n_types, hf, i, got;
    RS_TRY(rd(b, 0, f, RS_HEADER_FIXED_SIZE));
    if (memcmp(f + RS_HDR_OFF_MAGIC, RS_STREAM_MAGIC, 4)) return fail(b, RS_ERR_MAGIC, 0);
    if (le16(f + RS_HDR_OFF_MAJOR) != RS_STREAM_MAJOR) return fail(b, RS_ERR_VERSION, 4);
    n_types = le16(f + RS_HDR_OFF_N_TYPES);
    h->n_tensors = le32(f + RS_HDR_OFF_N_TENSORS);
    if (h->n_tensors > 0x10000u || n_types > 256u) return fail(b, RS_ERR_FORMAT, 72);
    /* the CRC first, over [0, HF): nothing after the magic is trusted before it */
    hf = RS_HEADER_FIXED_SIZE + RS_TYPE_ENTRY_SIZE * n_types + h->n_tensors
         + ((0u - h->n_tensors) & 3u);
    crc = crc32_update(0, f, RS_HEADER_FIXED_SIZE);
    for (i = RS_HEADER_FIXED_SIZE; i < hf; i += got) {
        got = hf - i < sizeof piece ? hf - i : (uint32_t)sizeof piece;
        RS_TRY(rd(b, i, piece, got));
        crc = crc32_update(crc, piece, got);
    }
    RS_TRY(rd(b, hf, piece, 4));
    if (le32(piece) != crc) return fail(b, RS_ERR_HEADER_CRC, hf);
    b->header_size = le32(f + RS_HDR_OFF_HEADER_SIZE);
    if (b->header_size != hf + 4 + pad16(hf + 4)) return fail(b, RS_ERR_FORMAT, 8);
    b->arch = f[RS_HDR_OFF_ARCH];
    b->tokenizer = f[RS_HDR_OFF_TOKENIZER];
    h->n_vocab = le32(f + RS_HDR_OFF_N_VOCAB);
    h->n_embd = le32(f + RS_HDR_OFF_N_EMBD);
    h->n_layer = le32(f + RS_HDR_OFF_N_LAYER);
    h->ffn_size = le32(f + RS_HDR_OFF_FFN_SIZE);
    h->n_head = le32(f + RS_HDR_OFF_N_HEAD);
    h->head_size = le32(f + RS_HDR_OFF_HEAD_SIZE);
    h->lora_maa = h->lora_decay = h->lora_w = h->lora_a = h->lora_v = h->lora_g = 0;
    if (b->arch == RS_ARCH_V6) {
        h->lora_maa = le32(f + RS_HDR_OFF_LORA_MAA);
        h->lora_decay = le32(f + RS_HDR_OFF_LORA_DECAY);
    } else if (b->arch == RS_ARCH_V7) {
        h->lora_w = le32(f + RS_HDR_OFF_LORA_W);
        h->lora_a = le32(f + RS_HDR_OFF_LORA_A);
        h->lora_v = le32(f + RS_HDR_OFF_LORA_V);
        h->lora_g = le32(f + RS_HDR_OFF_LORA_G);
    }
    {
        uint32_t e = le32(f + RS_HDR_OFF_LN_EPS), g = le32(f + RS_HDR_OFF_GN_EPS);
        memcpy(&h->ln_eps, &e, 4);
        memcpy(&h->gn_eps, &g, 4);
    }
    b->n_vocab = h->n_vocab;
    if (!rs_expected_tensors(b->arch, 1)) return fail(b, RS_ERR_ARCH, RS_HDR_OFF_ARCH);
    if (!h->n_vocab || !h->n_embd || !h->n_layer || !h->ffn_size || h->n_vocab > 0x1000000u
        || h->n_embd > 0x100000u || h->ffn_size > 0x100000u || h->n_layer > 0x1000u)
        return fail(b, RS_ERR_FORMAT, RS_HDR_OFF_N_VOCAB);
    if (b->arch != RS_ARCH_V4 && (!h->n_head || (uint64_t)h->n_head * h->head_size != h->n_embd))
        return fail(b, RS_ERR_FORMAT, RS_HDR_OFF_N_HEAD);
    if (h->n_tensors != rs_expected_tensors(b->arch, h->n_layer))
        return fail(b, RS_ERR_FORMAT, RS_HDR_OFF_N_TENSORS);
    if (le32(f + RS_HDR_OFF_EMB_OFFSET + 4) || le32(f + RS_HDR_OFF_BODY_SIZE + 4))
        return fail(b, RS_ERR_FORMAT, RS_HDR_OFF_BODY_SIZE);   /* > 4 GiB: not for this core */
    b->emb_offset = le32(f + RS_HDR_OFF_EMB_OFFSET);
    b->emb_row_bytes = le32(f + RS_HDR_OFF_EMB_ROW_BYTES);
    /* the type table: every entry must be a type this core implements */
    b->type_mask = 0;
    for (i = 0; i < n_types; i++) {
        uint32_t off = RS_HEADER_FIXED_SIZE + i * RS_TYPE_ENTRY_SIZE, id;
        RS_TRY(rd(b, off, piece, RS_TYPE_ENTRY_SIZE));
        id = piece[RS_TE_OFF_ID];
        if (!rs_type_block_size(id) || (piece[RS_TE_OFF_FLAGS] & RS_TYPE_FLAG_VARIABLE)
            || le16(piece + RS_TE_OFF_BLOCK_SIZE) != rs_type_block_size(id)
            || le16(piece + RS_TE_OFF_BLOCK_BYTES) != rs_type_block_bytes(id)
            || strncmp((const char *)piece + RS_TE_OFF_NAME, rs_type_name(id), RS_TYPE_NAME_SIZE)
            || le32(piece + RS_TE_OFF_PARAM0) || le32(piece + RS_TE_OFF_PARAM1))
            return fail(b, RS_ERR_TYPE, off);
        b->type_mask |= 1u << id;
    }
    /* the plan: every id in the table */
    for (i = 0; i < h->n_tensors; i += got) {
        uint32_t j, off = RS_HEADER_FIXED_SIZE + n_types * RS_TYPE_ENTRY_SIZE + i;
        got = h->n_tensors - i < sizeof piece ? h->n_tensors - i : (uint32_t)sizeof piece;
        RS_TRY(rd(b, off, piece, got));
        for (j = 0; j < got; j++)
            if (piece[j] >= 32 || !(b->type_mask >> piece[j] & 1u))
                return fail(b, RS_ERR_TYPE, off + j);
    }
    b->body_size = le32(f + RS_HDR_OFF_BODY_SIZE);
    b->plan_offset = RS_HEADER_FIXED_SIZE + n_types * RS_TYPE_ENTRY_SIZE;
    return RS_OK;
}

void rs_board_reset(rs_board *b) {
    size_t i, n = b->state_bytes / sizeof(float);
    if (!b->state) return;                  /* init has not carved the arena */
    for (i = 0; i < n; i++) b->state[i] = 0.0f;
    if (b->arch == RS_ARCH_V4) {
        uint32_t l, c, C = b->hp.n_embd;
        for (l = 0; l < b->hp.n_layer; l++)
            for (c = 0; c < C; c++) b->state[(size_t)l * 5 * C + 4 * C + c] = -1e30f;
    }
}

int rs_board_init(rs_board *b, rs_source *src, uint8_t *arena, size_t arena_size,
                  uint32_t chunk) {
    uint8_t h[RS_RECORD_HEADER_SIZE];
    uint32_t t, largest = 0, end;
    size_t skip;
    if (!b || !src || (!src->mapped && !src->read)) return RS_ERR_ARG;
    memset(b, 0, sizeof *b);
    b->src = src;
    b->fail_tensor = -1;
    b->failed = RS_ERR_FAILED;              /* until init succeeds */
    RS_TRY(parse_header(b));
    if (chunk < RS_RECORD_HEADER_SIZE) return RS_ERR_CHUNK;
    for (t = 0; t < 32; t++)
        if ((b->type_mask >> t & 1u) && rs_type_block_bytes(t) > largest)
            largest = rs_type_block_bytes(t);
    if (chunk < largest) return RS_ERR_CHUNK;
    b->chunk_size = chunk;
    b->arena_needed = carve(b, b->arch, &b->hp, chunk, NULL);
    skip = arena ? (size_t)((0u - (uintptr_t)arena) & 15u) : 0;
    if (!arena || arena_size < skip || arena_size - skip < b->arena_needed) return RS_ERR_NO_RAM;
    memset(arena + skip, 0, b->arena_needed);
    carve(b, b->arch, &b->hp, chunk, arena + skip);
    RS_TRY(rd(b, 0, b->header, RS_HEADER_FIXED_SIZE));
    b->state_bytes = (size_t)state_floats(b->arch, &b->hp) * sizeof(float);
    /* the embedding's record header, once: its type sizes every row */
    RS_TRY(rd(b, b->header_size, h, RS_RECORD_HEADER_SIZE));
    RS_TRY(check_record(b, h, b->header_size, 0));
    b->emb_type = b->rec_type;
    if (b->emb_offset != b->header_size + RS_RECORD_HEADER_SIZE
        || b->emb_row_bytes != b->hp.n_embd / rs_type_block_size(b->emb_type)
                                   * rs_type_block_bytes(b->emb_type))
        return fail(b, RS_ERR_FORMAT, RS_HDR_OFF_EMB_OFFSET);
    if ((uint64_t)b->emb_row_bytes * b->hp.n_vocab + b->emb_offset + 16 > b->body_size)
        return fail(b, RS_ERR_FORMAT, RS_HDR_OFF_EMB_OFFSET);
    end = b->emb_offset + b->emb_row_bytes * b->hp.n_vocab + RS_RECORD_CRC_SIZE;
    b->after_embedding = end + pad16(end);
    /* passes read single rows of it, so its payload CRC is checked once, here */
    b->pos = b->emb_offset;
    b->crc = 0;
    b->verifying = 1;
    b->next = 1;
    {
        uint32_t bb = rs_type_block_bytes(b->emb_type), left = b->rec_size / bb;
        uint32_t per = blocks_per_chunk(b, bb);
        while (left) {
            uint32_t nb = left < per ? left : per;
            const uint8_t *p;
            RS_TRY(fetch(b, nb * bb, &p));
            left -= nb;
        }
        RS_TRY(end_record(b));
    }
    b->verifying = 0;
    b->failed = RS_OK;
    rs_board_reset(b);
    return RS_OK;
}

int rs_board_eval(rs_board *b, uint32_t token, const float **logits) {
    int rc;
    if (!b) return RS_ERR_ARG;
    if (b->failed) return RS_ERR_FAILED;
    if (token >= b->hp.n_vocab) return RS_ERR_TOKEN;
    rc = rs_forward(b, token);
    if (rc) {
        b->failed = rc;                     /* the state holds a partial pass: unusable */
        return rc;
    }
    b->verified_all = 1;
    b->tokens++;
    if (logits) *logits = b->logits;
    return RS_OK;
}
