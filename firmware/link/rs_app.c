/* The board's commands (docs/protocol.md sections 4-9): handshake, install into flash, live
 * (the stream pulled with READ requests), run from flash, EVAL, LOGITS, RESET; the reply cache
 * for repeated non-idempotent requests, WORKING and BUSY while a command runs. The twin of
 * firmware_sim/link_board.py. */
#include <string.h>

#include "link_core.h"
#include "rs_app.h"
#include "rs_link.h"

#ifndef RS_STATE_SAVE_MAX
#define RS_STATE_SAVE_MAX (256 * 1024)
#endif

#define FLASH_DATA 4096u                /* the install record's sector; the stream follows */
enum { REC_EMPTY = 0, REC_PARTIAL = 1, REC_COMPLETE = 2 };
enum { SRC_NONE = 0, SRC_FLASH, SRC_LIVE };

static rs_port_info P;

/* -- the request being executed, its reply, the reply cache ---------------------------------- */
typedef struct { uint16_t seq; uint8_t op, valid; uint32_t crc; } req_key;
static uint8_t reqbuf[RS_LINK_MAX_PAYLOAD];
static uint8_t rep[RS_LINK_MAX_PAYLOAD];
static uint32_t rep_len;
static uint8_t cache[RS_WIRE_SIZE(RS_LINK_MAX_PAYLOAD)];
static uint32_t cache_len;
static req_key last_key, busy_key;
static char errtext[120];
static uint32_t pending_baud;

/* -- flash and the model --------------------------------------------------------------------- */
static struct { uint32_t state; uint64_t size; uint32_t crc; uint64_t verified; } rec;
static int model_src;                   /* SRC_*: what the loaded model reads */
static uint32_t model_key;              /* CRC-32 of the stream's first 112 bytes */
static uint64_t model_size;
static uint32_t tokens;
static const float *logits;
static uint8_t state_save[RS_STATE_SAVE_MAX];
static int core_failed;                 /* a pass failed: the core must be opened again, and
                                           state_save holds the state from before that EVAL */
rs_app_stats app_stats;

/* -- live ------------------------------------------------------------------------------------ */
#ifndef RS_LIVE_HEAD_CACHE
#define RS_LIVE_HEAD_CACHE 2048
#endif
static uint8_t live_buf[RS_LINK_MAX_WINDOW][RS_LINK_MAX_PAYLOAD];
static struct { uint64_t size, limit, next_req, last_end; int failed; uint32_t head_len; } live;
/* The stream's header, kept: the core looks up a record's plan entry in it between records,
 * and answering those from here keeps the READs of a pass sequential (read-ahead intact). */
static uint8_t live_head[RS_LIVE_HEAD_CACHE];

/* -- small helpers --------------------------------------------------------------------------- */
static char *put_str(char *o, const char *s) { while (*s) *o++ = *s++; *o = 0; return o; }
static char *put_u64(char *o, uint64_t v) {
    char t[24];
    int n = 0;
    do { t[n++] = (char)('0' + v % 10); v /= 10; } while (v);
    while (n) *o++ = t[--n];
    *o = 0;
    return o;
}
static char *put_hex(char *o, uint32_t v) {
    for (int i = 7; i >= 0; i--) *o++ = "0123456789abcdef"[(v >> (4 * i)) & 15];
    *o = 0;
    return o;
}
static int fail(int code, const char *text) {
    put_str(errtext, text);
    return code;
}
static int not_idempotent(uint8_t op) {
    return op == OP_SET_BAUD || op == OP_INSTALL || op == OP_LIVE || op == OP_RUN_FLASH ||
           op == OP_EVAL || op == OP_RESET;
}

/* -- the install record ---------------------------------------------------------------------- */
static void rec_load(void) {
    memset(&rec, 0, sizeof rec);
    if (!P.flash_size) return;
    const uint8_t *p = P.flash;
    if (memcmp(p, "RWKF", 4) || rs_crc32(0, p, 28) != ld32(p + 28)) return;
    rec.state = ld32(p + 4);
    rec.size = ld64(p + 8);
    rec.crc = ld32(p + 16);
    rec.verified = ld64(p + 20);
}

static void rec_save(uint32_t state, uint64_t size, uint32_t crc, uint64_t verified) {
    uint8_t b[32];
    memcpy(b, "RWKF", 4);
    st32(b + 4, state);
    st64(b + 8, size);
    st32(b + 16, crc);
    st64(b + 20, verified);
    st32(b + 28, rs_crc32(0, b, 28));
    port_flash_write(0, b, 32);
    rec.state = state, rec.size = size, rec.crc = crc, rec.verified = verified;
}

static uint32_t flash_capacity(void) { return P.flash_size > FLASH_DATA ? P.flash_size - FLASH_DATA : 0; }

/* -- sources --------------------------------------------------------------------------------- */
static int flash_read(void *ctx, uint32_t off, uint8_t *dst, uint32_t n) {
    (void)ctx;
    if ((uint64_t)off + n > rec.size) return -1;
    memcpy(dst, P.flash + FLASH_DATA + off, n);
    link_poll(0);                      /* a repeated EVAL gets WORKING meanwhile */
    return 0;
}

static int live_read(void *ctx, uint32_t offset, uint8_t *dst, uint32_t n) {
    (void)ctx;
    if (live.failed) return -1;
    if ((uint64_t)offset + n > live.size) { live.failed = E_BAD_STREAM; return -1; }
    if ((uint64_t)offset + n <= live.head_len) {
        memcpy(dst, live_head + offset, n);
        return 0;
    }
    int sequential = offset == live.last_end;
    rs_req *first = link_fifo_count() ? link_fifo_at(0) : 0;
    if (first && first->off <= offset && offset < live.next_req) {
        while (link_fifo_count() && link_fifo_at(0)->off + link_fifo_at(0)->len <= offset)
            link_fifo_pop();
    } else {
        link_fifo_clear();
        live.next_req = offset;
    }
    uint64_t end = (uint64_t)offset + n, pos = offset;
    while (pos < end) {
        while (link_fifo_count() < (int)P.window) {
            uint64_t upto;
            if (live.next_req < end) upto = live.size;
            else if (sequential && live.next_req < live.limit) upto = live.limit;
            else break;
            uint32_t len = upto - live.next_req < P.max_payload ? (uint32_t)(upto - live.next_req)
                                                                 : P.max_payload;
            rs_req *r = link_read(live.next_req, len, 0);
            r->buf = live_buf[link_slot(r)];
            live.next_req += len;
            app_stats.live_reads++;
        }
        rs_req *r = link_fifo_at(0);
        int rc = link_wait(r);
        if (rc) {
            live.failed = rc;
            link_fifo_clear();
            live.last_end = (uint64_t)-1;
            return -1;
        }
        uint64_t a = pos, b = r->off + r->len < end ? r->off + r->len : end;
        memcpy(dst + (a - offset), r->buf + (a - r->off), (size_t)(b - a));
        pos = b;
        if (r->off + r->len <= end) link_fifo_pop();
    }
    live.last_end = end;
    app_stats.live_bytes += n;
    return 0;
}

static rs_source flash_source = {flash_read, 0, 0};
static rs_source live_source = {live_read, 0, 0};

/* -- commands -------------------------------------------------------------------------------- */
static int do_hello(const uint8_t *p, uint32_t n) {
    if (n < 8) return fail(E_BAD_REQUEST, "HelloReq is 8 bytes");
    if (ld16(p) != RS_PROTOCOL_VERSION) return fail(E_VERSION, "the board speaks 1");
    last_key.valid = 0;
    /* the host counts window * (max_payload + frame overhead) of receive buffers in live mode */
    uint32_t link_ram = P.live ? P.window * RS_WIRE_SIZE(P.max_payload) : 0;
    uint16_t caps = (P.live ? CAP_LIVE : 0) | (P.flash_size ? CAP_INSTALL : 0) |
                    (P.flash_size && rec.state == REC_COMPLETE ? CAP_INSTALLED : 0);
    memset(rep, 0, 72);
    st16(rep, RS_PROTOCOL_VERSION);
    st16(rep + 2, caps);
    st32(rep + 4, P.max_payload);
    rep[8] = (uint8_t)P.window;
    int nt = lc_types(rep + 72);
    rep[9] = (uint8_t)nt;
    st32(rep + 12, P.arena_size + link_ram);
    st32(rep + 16, P.psram);
    st32(rep + 20, P.chunk);
    st64(rep + 24, flash_capacity());
    if (rec.state != REC_EMPTY) {
        st64(rep + 32, rec.size);
        st64(rep + 40, rec.verified);
        st32(rep + 48, rec.crc);
    }
    st32(rep + 52, model_src ? tokens : 0);
    for (int i = 0; i < 16 && P.name[i]; i++) rep[56 + i] = (uint8_t)P.name[i];
    rep_len = 72 + (uint32_t)nt;
    return E_OK;
}

static int do_set_baud(const uint8_t *p, uint32_t n) {
    if (n < 4) return fail(E_BAD_REQUEST, "u32 baud");
    uint32_t baud = ld32(p);
    if (baud < 1200) return fail(E_BAUD, "below 1200");
    pending_baud = baud;
    rep_len = 0;
    return E_OK;
}

static void on_install_data(rs_req *r, const uint8_t *data) {
    port_flash_write(FLASH_DATA + (uint32_t)r->off, data, r->len);
}

static int do_install(const uint8_t *p, uint32_t n) {
    if (!P.flash_size) return fail(E_NO_FLASH, "");
    if (n < 12) return fail(E_BAD_REQUEST, "InstallReq is 12 bytes");
    uint64_t size = ld64(p);
    uint32_t crc = ld32(p + 8);
    if (size > flash_capacity()) {
        char *o = put_u64(errtext, size);
        o = put_str(o, " bytes, flash holds ");
        put_u64(o, flash_capacity());
        return E_TOO_BIG;
    }
    if (rec.size != size || rec.crc != crc || rec.state == REC_EMPTY) {
        if (model_src == SRC_FLASH) model_src = SRC_NONE;   /* the flash changes under it */
        rec_save(REC_PARTIAL, size, crc, 0);
    }
    uint64_t resumed = rec.state == REC_PARTIAL ? rec.verified : size, pos = resumed;
    uint32_t since_save = 0, t0 = port_ms();
    link_fifo_clear();
    while (pos < size || link_fifo_count()) {
        while (link_fifo_count() < (int)P.window && pos < size) {
            uint32_t len = size - pos < P.max_payload ? (uint32_t)(size - pos) : P.max_payload;
            link_read(pos, len, 0);
            pos += len;
        }
        rs_req *r = link_fifo_at(0);
        int rc = link_wait(r);
        if (rc) {
            link_fifo_clear();
            rec_save(REC_PARTIAL, size, crc, rec.verified);
            return fail(rc, "READ failed after its retry budget");
        }
        uint64_t end = r->off + r->len;
        since_save += r->len;
        link_fifo_pop();
        if (since_save >= 16 * P.max_payload || end == size) {
            rec_save(REC_PARTIAL, size, crc, end);     /* written before it is marked verified */
            since_save = 0;
        }
    }
    uint32_t got = 0;
    for (uint64_t off = 0; off < size; off += 65536) {
        uint32_t len = size - off < 65536 ? (uint32_t)(size - off) : 65536;
        got = rs_crc32(got, P.flash + FLASH_DATA + off, len);
        link_poll(0);
    }
    app_stats.installs++;
    app_stats.install_bytes = size - resumed;
    app_stats.install_ms = port_ms() - t0;
    if (got != crc) {
        rec_save(REC_EMPTY, 0, 0, 0);
        char *o = put_str(errtext, "flash ");
        o = put_hex(o, got);
        o = put_str(o, ", host ");
        put_hex(o, crc);
        return E_CRC_MISMATCH;
    }
    rec_save(REC_COMPLETE, size, crc, size);
    char line[96], *o = put_str(line, "install: ");
    o = put_u64(o, size - resumed);
    o = put_str(o, " bytes in ");
    o = put_u64(o, app_stats.install_ms);
    put_str(o, " ms");
    port_log(line);
    memset(rep, 0, 24);
    st64(rep, resumed);
    st64(rep + 8, size);
    st32(rep + 16, got);
    rep_len = 24;
    return E_OK;
}

/* Parse the stream's header through `src` and carve the buffers; the same model as the one
 * loaded keeps its recurrent state and token count. */
static int load(rs_source *src, int kind, uint32_t key, uint64_t size) {
    /* protocol section 8: same first 112 bytes and size -> same model, wherever it is read */
    int same = model_src != SRC_NONE && model_key == key && model_size == size;
    uint8_t *state;
    size_t sb = same ? lc_state(&state) : 0;
    if (sb > sizeof state_save) same = 0, sb = 0;
    if (same && !core_failed) memcpy(state_save, state, sb);
    core_failed = 0;
    uint32_t kept = tokens;
    model_src = SRC_NONE;
    logits = 0;
    int rc = lc_init(src, P.arena, P.arena_size, P.chunk);
    if (kind == SRC_LIVE && live.failed) rc = live.failed;
    if (rc) {
        if (!errtext[0]) put_str(errtext, lc_error_text());
        return rc;
    }
    tokens = 0;
    if (same && lc_state(&state) == sb) {
        memcpy(state, state_save, sb);
        tokens = kept;
    }
    model_src = kind, model_key = key, model_size = size;
    {
        char line[80], *o = put_str(line, kind == SRC_LIVE ? "model: live, tokens " : "model: flash, tokens ");
        put_u64(o, tokens);
        port_log(line);
    }
    st32(rep, lc_n_vocab());
    rep[4] = lc_tokenizer();
    rep[5] = lc_arch();
    st16(rep + 6, 0);
    rep_len = 8;
    return E_OK;
}

static int do_live(const uint8_t *p, uint32_t n) {
    if (!P.live) return fail(E_UNKNOWN_OPCODE, "this board runs from flash only");
    if (n < 16) return fail(E_BAD_REQUEST, "LiveReq is 16 bytes");
    live.size = ld64(p);
    live.limit = ld64(p + 8) < live.size ? ld64(p + 8) : live.size;
    live.next_req = 0;
    live.last_end = (uint64_t)-1;
    live.failed = 0;
    live.head_len = 0;
    link_fifo_clear();
    if (live.size < 112 || live_read(0, 0, live_head, 112))
        return live.failed ? fail(live.failed, "reading the header") : fail(E_BAD_STREAM, "too short");
    uint32_t key = rs_crc32(0, live_head, 112), hs = ld32(live_head + 8);
    if (hs > sizeof live_head) hs = sizeof live_head;
    if (hs > live.size) hs = (uint32_t)live.size;
    if (hs > 112 && live_read(0, 112, live_head + 112, hs - 112))
        return fail(live.failed, "reading the header");
    live.head_len = hs;
    return load(&live_source, SRC_LIVE, key, live.size);
}

static int do_run_flash(void) {
    if (!P.flash_size || rec.state != REC_COMPLETE) return fail(E_NOT_INSTALLED, "");
    if (rec.size < 112) return fail(E_BAD_STREAM, "too short");
    flash_source.mapped = P.flash + FLASH_DATA;
    return load(&flash_source, SRC_FLASH, rs_crc32(0, P.flash + FLASH_DATA, 112), rec.size);
}

static uint32_t argmax(const float *x, uint32_t n) {
    uint32_t best = 0;
    for (uint32_t i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return best;
}

static int do_eval(const uint8_t *p, uint32_t n) {
    if (!model_src) return fail(E_NO_MODEL, "");
    if (n < 12) return fail(E_BAD_REQUEST, "EvalReq is 12 bytes");
    uint32_t pos = ld32(p), nt = ld16(p + 4), ngen = ld16(p + 6);
    if (n < 12 + 4 * nt) return fail(E_BAD_REQUEST, "fewer tokens than n");
    if (8 + 4 * ngen > P.max_payload) return fail(E_BAD_REQUEST, "n_generate exceeds one reply");
    if (pos != tokens) {
        char *o = put_str(errtext, "the board has consumed ");
        o = put_u64(o, tokens);
        o = put_str(o, " tokens, not ");
        put_u64(o, pos);
        return E_POSITION;
    }
    uint32_t nv = lc_n_vocab();
    for (uint32_t i = 0; i < nt; i++)
        if (ld32(p + 12 + 4 * i) >= nv) {
            char *o = put_u64(errtext, ld32(p + 12 + 4 * i));
            o = put_str(o, " >= ");
            put_u64(o, nv);
            return E_TOKEN;
        }
    uint8_t *state;
    size_t sb = lc_state(&state);
    int saved = sb <= sizeof state_save;
    if (core_failed) {                  /* the last EVAL failed mid-pass: open the core again */
        live.failed = 0;
        int rc = lc_init(model_src == SRC_LIVE ? &live_source : &flash_source, P.arena,
                         P.arena_size, P.chunk);
        if (model_src == SRC_LIVE && live.failed) rc = live.failed;
        if (rc) return fail(rc, "opening the stream again");
        sb = lc_state(&state);
        if (saved) memcpy(state, state_save, sb);
        core_failed = 0;
    }
    if (saved) memcpy(state_save, state, sb);
    uint32_t tokens0 = tokens, ngot = 0;
    uint64_t t0 = port_ns();
    int rc = E_OK;
    live.failed = 0;
    for (uint32_t i = 0; i < nt + ngen && rc == E_OK; i++) {
        uint32_t t;
        if (i < nt) t = ld32(p + 12 + 4 * i);
        else { t = argmax(logits, nv); st32(rep + 8 + 4 * ngot++, t); }
        rc = lc_eval(t, &logits);
        if (rc == E_OK) tokens++;
        if (model_src == SRC_LIVE && live.failed) rc = live.failed;
        else link_poll(0);                 /* between tokens: WORKING for a repeated EVAL */
    }
    if (rc) {
        if (saved) memcpy(state, state_save, sb);
        core_failed = 1;                /* the core refuses further passes until opened again */
        tokens = tokens0;
        logits = 0;
        link_fifo_clear();
        live.last_end = (uint64_t)-1;
        app_stats.aborted_passes++;
        return fail(rc == E_LOST ? E_LOST : rc, rc == E_LINK ? "a READ failed" : "");
    }
    uint64_t ns = port_ns() - t0;
    app_stats.evals++;
    app_stats.eval_tokens += nt + ngen;
    app_stats.eval_ns += ns;
    char line[120], *o = put_str(line, "eval: tokens=");
    o = put_u64(o, nt + ngen);
    o = put_str(o, " ns=");
    o = put_u64(o, ns);
    o = put_str(o, " ns_per_token=");
    put_u64(o, (nt + ngen) ? ns / (nt + ngen) : 0);
    port_log(line);
    st32(rep, tokens);
    st16(rep + 4, (uint16_t)ngot);
    st16(rep + 6, 0);
    rep_len = 8 + 4 * ngot;
    return E_OK;
}

static int do_logits(const uint8_t *p, uint32_t n) {
    if (!model_src) return fail(E_NO_MODEL, "");
    if (n < 8) return fail(E_BAD_REQUEST, "u32 offset, u32 length");
    uint32_t off = ld32(p), len = ld32(p + 4), total = 4 * lc_n_vocab();
    if ((uint64_t)off + len > total || len > P.max_payload) return fail(E_RANGE, "");
    if (logits) memcpy(rep, (const uint8_t *)logits + off, len);      /* little-endian f32 */
    else memset(rep, 0, len);
    rep_len = len;
    return E_OK;
}

static int do_reset(void) {
    if (!model_src) return fail(E_NO_MODEL, "");
    lc_reset();
    if (core_failed) {                  /* the next EVAL reopens the core with this state */
        uint8_t *state;
        size_t sb = lc_state(&state);
        if (sb <= sizeof state_save) memcpy(state_save, state, sb);
    }
    tokens = 0;
    logits = 0;
    rep_len = 0;
    return E_OK;
}

static int dispatch(uint8_t op, const uint8_t *p, uint32_t n) {
    switch (op) {
    case OP_HELLO: return do_hello(p, n);
    case OP_SET_BAUD: return do_set_baud(p, n);
    case OP_INSTALL: return do_install(p, n);
    case OP_LIVE: return do_live(p, n);
    case OP_RUN_FLASH: return do_run_flash();
    case OP_EVAL: return do_eval(p, n);
    case OP_LOGITS: return do_logits(p, n);
    case OP_RESET: return do_reset();
    default: {
        char *o = put_str(errtext, "opcode 0x");
        o[0] = "0123456789abcdef"[op >> 4];
        o[1] = "0123456789abcdef"[op & 15];
        o[2] = 0;
        return E_UNKNOWN_OPCODE;
    }
    }
}

static void on_request(const rs_frame *f) {
    req_key k = {f->seq, f->op, 1, rs_crc32(0, f->payload, f->n)};
    int ni = not_idempotent(f->op);
    if (ni && last_key.valid && k.seq == last_key.seq && k.op == last_key.op && k.crc == last_key.crc) {
        link_write(cache, cache_len);               /* a repeat: answer again, do not re-run */
        return;
    }
    if (busy_key.valid) {
        if (k.seq == busy_key.seq && k.op == busy_key.op && k.crc == busy_key.crc)
            link_send(OP_WORKING, RS_FLAG_REPLY, f->seq, 0, 0);
        else
            link_send_error(f->seq, E_BUSY, "");
        return;
    }
    if (f->n > P.max_payload) {                     /* COBS can carry a little more */
        link_send_error(f->seq, E_BAD_REQUEST, "payload exceeds max_payload");
        return;
    }
    busy_key = k;
    uint32_t n = f->n;
    memcpy(reqbuf, f->payload, n);                  /* the receive buffer is reused meanwhile */
    errtext[0] = 0;
    rep_len = 0;
    int rc = dispatch(k.op, reqbuf, n);
    busy_key.valid = 0;
    if (rc == E_LOST) return;
    if (rc == E_OK) link_send(k.op, RS_FLAG_REPLY, k.seq, rep, rep_len);
    else link_send_error(k.seq, (uint16_t)rc, errtext);
    if (ni) {
        memcpy(cache, link_tx, link_tx_len);
        cache_len = link_tx_len;
        last_key = k;
    }
    if (pending_baud) {
        port_set_baud(pending_baud);
        pending_baud = 0;
    }
}

int rs_app_main(int argc, char **argv) {
    if (port_init(argc, argv, &P)) return 1;
    if (P.max_payload > RS_LINK_MAX_PAYLOAD) P.max_payload = RS_LINK_MAX_PAYLOAD;
    if (P.max_payload < RS_MIN_MAX_PAYLOAD) P.max_payload = RS_MIN_MAX_PAYLOAD;
    if (P.window > RS_LINK_MAX_WINDOW) P.window = RS_LINK_MAX_WINDOW;
    if (P.window < 1) P.window = 1;
    link_init(&P, on_request, on_install_data);
    rec_load();
    port_log("board ready");
    for (;;) {
        if (port_connect() < 0) return 0;
        link_reset();
        last_key.valid = 0;
        while (link_poll(100) == 0) {
        }
    }
}
