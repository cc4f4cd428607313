/* The board's end of the link: see rs_link.h. One byte queue, one receive buffer, one transmit
 * buffer, all static; requests from the host are handed to the application one at a time (it
 * may call link_poll again while it executes one: the queue is shared, so order is kept). */
#include "rs_link.h"

#include <string.h>

#define WIRE_MAX RS_WIRE_SIZE(RS_LINK_MAX_PAYLOAD)

uint8_t link_tx[WIRE_MAX];
uint32_t link_tx_len;
rs_link_stats link_stats;

static uint8_t rx[WIRE_MAX];            /* the frame being received (COBS, then decoded) */
static uint32_t rx_len;
static int rx_overflow;
static uint8_t in[512];                 /* bytes read from the port, not yet looked at */
static uint32_t in_pos, in_len;
static int lost;

static rs_req fifo[RS_LINK_MAX_WINDOW];
static int fifo_head, fifo_n;
static uint16_t next_seq;
static uint32_t stamp;

static const rs_port_info *port;
static rs_request_fn on_request;
static rs_data_fn on_data;
static uint32_t reply_ms, max_rx;

static uint32_t now_ms(void) { return port_ms(); }
static int after(uint32_t t, uint32_t deadline) { return (int32_t)(t - deadline) >= 0; }

void link_init(const rs_port_info *info, rs_request_fn req_fn, rs_data_fn data_fn) {
    port = info;
    on_request = req_fn;
    on_data = data_fn;
    uint32_t mp = info->max_payload;
    uint32_t frame_ms = (uint32_t)((uint64_t)RS_WIRE_SIZE(mp) * 10u * 1000u / info->timeout_baud);
    reply_ms = RS_TURNAROUND_MS + (info->window + 2) * frame_ms;
    if (reply_ms < RS_MIN_REPLY_MS) reply_ms = RS_MIN_REPLY_MS;
    if (info->reply_ms) reply_ms = info->reply_ms;
    max_rx = RS_WIRE_SIZE(mp) - 1;      /* the delimiter is not stored */
    next_seq = (uint16_t)(now_ms() * 2654435761u >> 16);
    link_reset();
}

void link_reset(void) {
    rx_len = 0;
    rx_overflow = 0;
    in_pos = in_len = 0;
    lost = 0;
    link_fifo_clear();
}

uint32_t link_reply_ms(void) { return reply_ms; }

/* -- sending ---------------------------------------------------------------------------------- */
int link_write(const uint8_t *wire, uint32_t n) {
    if (lost) return E_LOST;
    if (port_write(wire, n) < 0) { lost = 1; return E_LOST; }
    link_stats.wire_out += n;
    return 0;
}

/* COBS over three pieces (header, payload, CRC) without assembling the raw frame. */
int link_send(uint8_t op, uint8_t flags, uint16_t seq, const uint8_t *payload, uint32_t n) {
    uint8_t head[4] = {op, flags, (uint8_t)seq, (uint8_t)(seq >> 8)}, tail[4];
    uint32_t crc = rs_crc32(rs_crc32(0, head, 4), payload, n);
    st32(tail, crc);
    const uint8_t *part[3] = {head, payload, tail};
    uint32_t plen[3] = {4, n, 4}, total = n + 8, done = 0;
    uint8_t *out = link_tx, code = 1;
    uint32_t code_at = 0, o = 1;
    for (int k = 0; k < 3; k++) {
        for (uint32_t i = 0; i < plen[k]; i++) {
            uint8_t b = part[k][i];
            done++;
            if (b) {
                out[o++] = b;
                if (++code == 0xFF && done < total) { out[code_at] = code; code_at = o++; code = 1; }
            } else {
                out[code_at] = code; code_at = o++; code = 1;
            }
        }
    }
    out[code_at] = code;
    out[o++] = 0;
    link_tx_len = o;
    link_stats.frames_out++;
    return link_write(out, o);
}

int link_send_error(uint16_t seq, uint16_t code, const char *text) {
    uint8_t p[2 + 200];
    uint32_t n = 0;
    st16(p, code);
    if (text) while (text[n] && n < 200) { p[2 + n] = (uint8_t)text[n]; n++; }
    return link_send(OP_ERROR, RS_FLAG_REPLY, seq, p, 2 + n);
}

/* -- the READ FIFO ---------------------------------------------------------------------------- */
int link_fifo_count(void) { return fifo_n; }
rs_req *link_fifo_at(int i) { return &fifo[(fifo_head + i) % (int)port->window]; }

static int send_read(rs_req *r) {
    uint8_t p[12];
    st64(p, r->off);
    st32(p + 8, r->len);
    r->stamp = ++stamp;
    r->sent_ms = now_ms();
    return link_send(OP_READ, 0, r->seq, p, 12);
}

rs_req *link_read(uint64_t off, uint32_t len, uint8_t *buf) {
    if (fifo_n >= (int)port->window) return 0;
    rs_req *r = &fifo[(fifo_head + fifo_n) % (int)port->window];
    fifo_n++;
    memset(r, 0, sizeof *r);
    r->off = off;
    r->len = len;
    r->buf = buf;
    r->seq = next_seq++;
    r->state = REQ_INFLIGHT;
    r->wait = reply_ms;
    send_read(r);
    r->deadline = r->sent_ms + r->wait;
    return r;
}

int link_slot(const rs_req *r) { return (int)(r - fifo); }

void link_fifo_pop(void) {
    if (!fifo_n) return;
    link_fifo_at(0)->state = REQ_FREE;
    fifo_head = (fifo_head + 1) % (int)port->window;
    fifo_n--;
}

void link_fifo_clear(void) {
    for (int i = 0; i < RS_LINK_MAX_WINDOW; i++) fifo[i].state = REQ_FREE;
    fifo_head = fifo_n = 0;
}

static void resend(rs_req *r, uint32_t now, int timed_out) {
    if (timed_out) {
        link_stats.timeouts++;
        if (++r->tries > RS_RETRIES) { r->state = REQ_FAILED; r->err = E_LINK; return; }
        uint32_t cap = r->wait > RS_MAX_WAIT_MS ? r->wait : RS_MAX_WAIT_MS;
        r->wait = r->wait * RS_BACKOFF < cap ? r->wait * RS_BACKOFF : cap;
        r->deadline = now + r->wait;       /* an early resend (NAK, gap) keeps the timer */
    }
    link_stats.retransmits++;
    send_read(r);
}

static void resend_all(uint32_t now) {            /* after a NAK or a corrupt frame */
    uint32_t holdoff = reply_ms / 4;
    for (int i = 0; i < fifo_n; i++) {
        rs_req *r = link_fifo_at(i);
        if (r->state == REQ_INFLIGHT && now - r->sent_ms >= holdoff) resend(r, now, 0);
    }
}

static rs_req *find(uint16_t seq) {
    for (int i = 0; i < fifo_n; i++) {
        rs_req *r = link_fifo_at(i);
        if (r->state == REQ_INFLIGHT && r->seq == seq) return r;
    }
    return 0;
}

/* -- receiving -------------------------------------------------------------------------------- */
static void on_frame(uint32_t len, int overflow) {
    uint32_t now = now_ms();
    uint32_t n = 0;
    if (!overflow && len) n = (uint32_t)rs_cobs_decode(rx, len, rx);
    if (n < RS_FRAME_MIN || rs_crc32(0, rx, n - 4) != ld32(rx + n - 4)) {
        link_stats.corrupt++;
        link_send(OP_NAK, 0, 0, 0, 0);
        resend_all(now);
        return;
    }
    link_stats.frames_in++;
    rs_frame f = {rx[0], rx[1], ld16(rx + 2), rx + 4, n - 8};
    if (f.op == OP_NAK) {
        link_stats.naks_in++;
        resend_all(now);
    } else if (f.flags & RS_FLAG_REPLY) {
        rs_req *r = find(f.seq);
        if (!r || (f.op != OP_READ && f.op != OP_ERROR)) { link_stats.duplicates++; return; }
        if (f.op == OP_ERROR) {
            r->state = REQ_FAILED;
            r->err = E_LINK;
        } else if (f.n != r->len) {
            r->state = REQ_FAILED;
            r->err = E_LINK;
        } else {
            if (r->buf) memcpy(r->buf, f.payload, f.n);
            else if (on_data) on_data(r, f.payload);
            r->state = REQ_DONE;
        }
        /* Fast retransmit: the host answers in order, so what was sent before is lost. */
        for (int i = 0; i < fifo_n; i++) {
            rs_req *q = link_fifo_at(i);
            if (q->state == REQ_INFLIGHT && (int32_t)(q->stamp - r->stamp) < 0) {
                link_stats.fast_retransmits++;
                resend(q, now, 0);
            }
        }
    } else if (on_request) {
        on_request(&f);
    }
}

int link_poll(uint32_t wait_ms) {
    if (lost) return E_LOST;
    uint32_t now = now_ms();
    if (in_pos >= in_len) {
        for (int i = 0; i < fifo_n; i++) {
            rs_req *r = link_fifo_at(i);
            if (r->state != REQ_INFLIGHT) continue;
            uint32_t left = after(now, r->deadline) ? 0 : r->deadline - now;
            if (left < wait_ms) wait_ms = left;
        }
        int got = port_read(in, sizeof in, wait_ms);
        if (got < 0) { lost = 1; link_fifo_clear(); return E_LOST; }
        in_pos = 0;
        in_len = (uint32_t)got;
        link_stats.wire_in += (uint32_t)got;
    }
    while (in_pos < in_len && !lost) {
        uint8_t b = in[in_pos++];
        if (b == 0) {
            uint32_t len = rx_len;
            int overflow = rx_overflow;
            rx_len = 0;
            rx_overflow = 0;
            if (len || overflow) on_frame(len, overflow);   /* may poll again (nested) */
        } else if (rx_len < max_rx) {
            rx[rx_len++] = b;
        } else {
            rx_overflow = 1;                           /* dropped until the next zero */
        }
    }
    if (lost) { link_fifo_clear(); return E_LOST; }
    now = now_ms();
    for (int i = 0; i < fifo_n; i++) {
        rs_req *r = link_fifo_at(i);
        if (r->state == REQ_INFLIGHT && after(now, r->deadline)) resend(r, now, 1);
    }
    return lost ? E_LOST : 0;
}

int link_wait(rs_req *r) {
    while (r->state == REQ_INFLIGHT) {
        int rc = link_poll(reply_ms);
        if (rc) return rc;
    }
    return r->state == REQ_DONE ? 0 : (r->err ? r->err : E_LINK);
}
