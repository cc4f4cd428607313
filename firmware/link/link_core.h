/* The link's view of the board core (firmware/core/rwkv_board.h): everything the commands need
 * from it, in one place, with its results as protocol error codes (rs_wire.h). */
#ifndef LINK_CORE_H
#define LINK_CORE_H

#include <stddef.h>
#include <stdint.h>

#include "rwkv_board.h"

int lc_init(rs_source *src, uint8_t *arena, size_t arena_size, uint32_t chunk);
int lc_eval(uint32_t token, const float **logits);
void lc_reset(void);
uint32_t lc_n_vocab(void);
uint8_t lc_arch(void);
uint8_t lc_tokenizer(void);
size_t lc_state(uint8_t **state);     /* the recurrent state: saved and restored by EVAL */
int lc_types(uint8_t *ids);           /* type ids the core implements (<= 16) */
const char *lc_error_text(void);      /* detail for the last failure, may be "" */

#endif
