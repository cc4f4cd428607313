/* Protocol numbers (docs/protocol.md; host/link/protocol.py holds the same) and the wire
 * helpers: CRC-32 (zlib's), COBS, little-endian loads and stores. */
#ifndef RS_WIRE_H
#define RS_WIRE_H

#include <stddef.h>
#include <stdint.h>

#define RS_PROTOCOL_VERSION 1
#define RS_FLAG_REPLY 0x01
#define RS_FRAME_HEAD 4                     /* opcode, flags, seq */
#define RS_FRAME_MIN 8                      /* head + crc */
#define RS_MIN_MAX_PAYLOAD 64
/* Wire bytes of a frame with n payload bytes, delimiter included. */
#define RS_WIRE_SIZE(n) ((n) + 8 + ((n) + 8) / 254 + 1 + 1)

enum {
    OP_HELLO = 0x01, OP_SET_BAUD = 0x02, OP_INSTALL = 0x03, OP_LIVE = 0x04, OP_RUN_FLASH = 0x05,
    OP_EVAL = 0x06, OP_LOGITS = 0x07, OP_RESET = 0x08, OP_READ = 0x20, OP_WORKING = 0x7D,
    OP_ERROR = 0x7E, OP_NAK = 0x7F
};

enum {
    E_OK = 0, E_BAD_REQUEST = 1, E_UNKNOWN_OPCODE = 2, E_VERSION = 3, E_BUSY = 4, E_NO_MODEL = 5,
    E_NOT_INSTALLED = 6, E_NO_FLASH = 7, E_TOO_BIG = 8, E_UNSUPPORTED_TYPE = 9, E_NO_RAM = 10,
    E_BAD_STREAM = 11, E_CRC_MISMATCH = 12, E_TOKEN = 13, E_POSITION = 14, E_LINK = 15,
    E_BAUD = 16, E_RANGE = 17,
    E_LOST = 1000                           /* internal: the connection went away, no reply */
};

#define CAP_INSTALL 1
#define CAP_LIVE 2
#define CAP_INSTALLED 4

/* Timeouts (protocol section 3), in milliseconds. */
#define RS_RETRIES 6
#define RS_BACKOFF 2
#define RS_MAX_WAIT_MS 2000
#define RS_TURNAROUND_MS 20
#define RS_MIN_REPLY_MS 50

uint32_t rs_crc32(uint32_t crc, const uint8_t *p, size_t n);
size_t rs_cobs_encode(const uint8_t *in, size_t n, uint8_t *out);
size_t rs_cobs_decode(const uint8_t *in, size_t n, uint8_t *out);   /* 0 on error */

static inline uint16_t ld16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }
static inline uint32_t ld32(const uint8_t *p) {
    return p[0] | p[1] << 8 | p[2] << 16 | (uint32_t)p[3] << 24;
}
static inline uint64_t ld64(const uint8_t *p) { return ld32(p) | (uint64_t)ld32(p + 4) << 32; }
static inline void st16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }
static inline void st32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); p[2] = (uint8_t)(v >> 16); p[3] = (uint8_t)(v >> 24);
}
static inline void st64(uint8_t *p, uint64_t v) { st32(p, (uint32_t)v); st32(p + 4, (uint32_t)(v >> 32)); }

#endif
