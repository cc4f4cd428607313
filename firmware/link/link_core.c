/* Adapter from the board core's API to the link's needs (link_core.h). */
#include "link_core.h"

#include "rs_wire.h"

uint32_t rs_type_block_size(uint32_t type_id);   /* rs_kernels.h: 0 when the core lacks the type */

static rs_board board;
static int last_rc;

static int code(int rc) {
    last_rc = rc;
    switch (rc) {
    case RS_OK: return E_OK;
    case RS_ERR_IO: return E_LINK;
    case RS_ERR_TYPE: return E_UNSUPPORTED_TYPE;
    case RS_ERR_NO_RAM: return E_NO_RAM;
    case RS_ERR_TOKEN: return E_TOKEN;
    default: return E_BAD_STREAM;      /* magic, version, CRCs, kinds, shapes, chunk */
    }
}

int lc_init(rs_source *src, uint8_t *arena, size_t arena_size, uint32_t chunk) {
    return code(rs_board_init(&board, src, arena, arena_size, chunk));
}
int lc_eval(uint32_t token, const float **logits) { return code(rs_board_eval(&board, token, logits)); }
void lc_reset(void) { rs_board_reset(&board); }
uint32_t lc_n_vocab(void) { return board.n_vocab; }
uint8_t lc_arch(void) { return (uint8_t)board.arch; }
uint8_t lc_tokenizer(void) { return (uint8_t)board.tokenizer; }
size_t lc_state(uint8_t **state) { *state = (uint8_t *)board.state; return board.state_bytes; }
int lc_types(uint8_t *ids) {
    int n = 0;
    for (uint32_t id = 0; id < 32 && n < 16; id++)
        if (rs_type_block_size(id)) ids[n++] = (uint8_t)id;
    return n;
}
const char *lc_error_text(void) { return last_rc ? rs_strerror(last_rc) : ""; }
