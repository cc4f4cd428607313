/* STAND-IN for the board core (firmware/core), used only while it is missing: see
 * stub/rwkv_board.h. It checks the header (magic, major, CRC, type ids) and per token reads the
 * embedding row and every byte up to the END record through the chunk buffer. */
#include <string.h>

#include "rwkv_board.h"
#include "rs_wire.h"

const char *rs_strerror(int code) { return code ? "stub core: error" : ""; }

uint32_t rs_type_block_size(uint32_t id) {
    return id <= 1 || id == 30 ? 1 : (id == 2 || id == 3 || id == 6 || id == 7 || id == 8) ? 32 : 0;
}

static int rd(rs_board *b, uint32_t off, uint8_t *dst, uint32_t n) {
    return b->src->read(b->src->ctx, off, dst, n) ? RS_ERR_IO : RS_OK;
}

int rs_board_init(rs_board *b, rs_source *src, uint8_t *arena, size_t arena_size, uint32_t chunk) {
    uint8_t h[112];
    memset(b, 0, sizeof *b);
    b->src = src;
    b->chunk = chunk;
    if (rd(b, 0, h, 112)) return RS_ERR_IO;
    if (memcmp(h, "RWKS", 4) || ld16(h + 4) != 1) return RS_ERR_FORMAT;
    b->header_size = ld32(h + 8);
    b->arch = h[12];
    b->tokenizer = h[13];
    b->n_vocab = ld32(h + 16);
    b->emb_offset = ld64(h + 80);
    b->emb_row_bytes = ld32(h + 88);
    b->body_size = (uint32_t)ld64(h + 96);
    uint32_t n_tensors = ld32(h + 72), n_types = ld16(h + 76);
    uint32_t hf = 112 + 32 * n_types + n_tensors + ((4 - n_tensors % 4) % 4);
    size_t need = 4u * b->n_vocab + chunk + 64;
    if (need > arena_size) return RS_ERR_NO_RAM;
    b->logits = (float *)arena;
    b->buf = arena + 4u * b->n_vocab;
    b->state = (float *)(b->buf + chunk);
    b->state_bytes = 64;
    uint32_t crc = rs_crc32(0, h, 112), off = 112;
    while (off < hf + 4) {
        uint32_t n = hf + 4 - off < chunk ? hf + 4 - off : chunk;
        if (rd(b, off, b->buf, n)) return RS_ERR_IO;
        for (uint32_t i = 0; i < n; i++) {
            uint32_t at = off + i;
            if (at < hf) crc = rs_crc32(crc, b->buf + i, 1);
            if (at >= 112 && at < 112 + 32 * n_types && (at - 112) % 32 == 0) {
                uint8_t id = b->buf[i];
                if (!rs_type_block_size(id)) return RS_ERR_TYPE;
            }
        }
        if (off + n == hf + 4 && ld32(b->buf + n - 4) != crc) return RS_ERR_FORMAT;
        off += n;
    }
    rs_board_reset(b);
    return RS_OK;
}

void rs_board_reset(rs_board *b) { memset(b->state, 0, b->state_bytes); }

int rs_board_eval(rs_board *b, uint32_t token, const float **logits) {
    if (token >= b->n_vocab) return RS_ERR_FORMAT;
    uint32_t row = b->emb_row_bytes < b->chunk ? b->emb_row_bytes : b->chunk;
    if (rd(b, (uint32_t)(b->emb_offset + (uint64_t)token * b->emb_row_bytes), b->buf, row))
        return RS_ERR_IO;
    uint32_t h0;
    memcpy(&h0, b->state, 4);
    uint32_t h = rs_crc32(h0, b->buf, row);
    uint32_t off = (uint32_t)(b->emb_offset + (uint64_t)b->n_vocab * b->emb_row_bytes);
    off += 4;
    off += (16 - off % 16) % 16;
    uint32_t end = b->body_size - 48;
    while (off < end) {
        uint32_t n = end - off < b->chunk ? end - off : b->chunk;
        if (rd(b, off, b->buf, n)) return RS_ERR_IO;
        h = rs_crc32(h, b->buf, n);
        off += n;
    }
    memcpy(b->state, &h, 4);
    for (uint32_t i = 0; i < b->n_vocab; i++)
        b->logits[i] = (float)((h ^ (i * 2654435761u)) >> 8) / 16777216.0f;
    *logits = b->logits;
    return RS_OK;
}
