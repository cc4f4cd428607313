/* The board's end of the link (docs/protocol.md sections 2, 3, 6): frames in and out, and the
 * board's own READ requests in flight -- a FIFO of up to `window`, retransmitted on timeout
 * (with back-off), on NAK and on a later reply (fast retransmit), given up after RS_RETRIES. */
#ifndef RS_LINK_H
#define RS_LINK_H

#include <stdint.h>

#include "rs_port.h"
#include "rs_wire.h"

#ifndef RS_LINK_MAX_PAYLOAD
#define RS_LINK_MAX_PAYLOAD 4096
#endif
#ifndef RS_LINK_MAX_WINDOW
#define RS_LINK_MAX_WINDOW 16
#endif

typedef struct rs_frame {
    uint8_t op, flags;
    uint16_t seq;
    const uint8_t *payload;
    uint32_t n;
} rs_frame;

enum { REQ_FREE = 0, REQ_INFLIGHT, REQ_DONE, REQ_FAILED };

typedef struct rs_req {
    uint64_t off;
    uint32_t len;
    uint8_t *buf;          /* the answer's bytes go here; NULL: to the data callback */
    uint16_t seq;
    uint8_t state, tries;
    uint16_t err;          /* REQ_FAILED: E_LINK (retry budget) or the host's error code */
    uint32_t wait, deadline, stamp, sent_ms;
} rs_req;

typedef void (*rs_request_fn)(const rs_frame *f);               /* a request from the host */
typedef void (*rs_data_fn)(rs_req *r, const uint8_t *data);     /* a READ answer, buf NULL */

void link_init(const rs_port_info *info, rs_request_fn on_request, rs_data_fn on_data);
void link_reset(void);                 /* a new connection: drop buffers and requests */
uint32_t link_reply_ms(void);

/* Read and act on what arrived within wait_ms; retransmit what timed out.
 * 0, or E_LOST when the connection went away. */
int link_poll(uint32_t wait_ms);

/* Encode and send one frame. 0 or E_LOST. The encoded bytes stay in link_tx until the next
 * send (for the reply cache). */
int link_send(uint8_t op, uint8_t flags, uint16_t seq, const uint8_t *payload, uint32_t n);
int link_send_error(uint16_t seq, uint16_t code, const char *text);
int link_write(const uint8_t *wire, uint32_t n);
extern uint8_t link_tx[];
extern uint32_t link_tx_len;

/* The READ FIFO. */
int link_fifo_count(void);
rs_req *link_fifo_at(int i);           /* 0 = oldest */
rs_req *link_read(uint64_t off, uint32_t len, uint8_t *buf);    /* NULL if the FIFO is full */
int link_slot(const rs_req *r);        /* 0 .. window-1: which buffer a request may use */
void link_fifo_pop(void);
void link_fifo_clear(void);            /* drop all: late answers are discarded as duplicates */
/* Poll until r is answered. 0, E_LINK (given up, or the host answered ERROR) or E_LOST. */
int link_wait(rs_req *r);

typedef struct rs_link_stats {
    uint32_t frames_in, frames_out, corrupt, naks_in, retransmits, fast_retransmits,
        duplicates, timeouts;
    uint64_t wire_in, wire_out;
} rs_link_stats;
extern rs_link_stats link_stats;

#endif
