/* The hardware layer the link needs: one byte pipe, a millisecond clock, storage that reads
 * like memory (XIP flash, PSRAM standing in for it) and RAM for the model's buffers.
 *
 * Two ports implement it: port/host (POSIX: a pty, a tty or a TCP socket, flash in a file) and
 * port/mps2-an385 (QEMU's Cortex-M3 board: CMSDK UART0, SysTick, SSRAM/PSRAM). The link
 * (firmware/link) and the board core (firmware/core) never touch hardware directly.
 */
#ifndef RS_PORT_H
#define RS_PORT_H

#include <stddef.h>
#include <stdint.h>

typedef struct rs_port_info {
    const char *name;          /* board name in the handshake (<= 16 chars) */
    uint8_t *flash;            /* storage, memory-mapped: install record at 0, stream at 4096 */
    uint32_t flash_size;       /* bytes of it (0: no storage, live only) */
    uint8_t *arena;            /* RAM for the model's buffers (the core carves it) */
    uint32_t arena_size;
    uint32_t psram;            /* advertised external RAM (0: none) */
    uint32_t chunk;            /* the core's chunk buffer */
    uint32_t max_payload;      /* largest frame payload (<= RS_LINK_MAX_PAYLOAD) */
    uint32_t window;           /* READs in flight (<= RS_LINK_MAX_WINDOW) */
    uint32_t timeout_baud;     /* the rate the board scales its timeouts to (bits/s, 8N1) */
    uint32_t reply_ms;         /* first wait for a READ answer; 0: from timeout_baud */
    int live;                  /* runs live (caps bit 1) */
} rs_port_info;

/* Set up the hardware (host: parse argv, open the port); fill *info. 0 on success. */
int port_init(int argc, char **argv, rs_port_info *info);

/* Wait for the peer (host port: accept a connection on a socket). 0 when connected,
 * < 0 when the board should stop. */
int port_connect(void);

/* Up to max bytes that arrived, waiting at most wait_ms for the first one. 0: nothing;
 * < 0: the connection is lost (the host hung up; never on a UART). */
int port_read(uint8_t *buf, uint32_t max, uint32_t wait_ms);

/* Send n bytes (blocking until they are queued). < 0: the connection is lost. */
int port_write(const uint8_t *buf, uint32_t n);

/* Wait until everything written has left the UART (SET_BAUD), then switch. 0: done. */
int port_set_baud(uint32_t baud);

/* Milliseconds since boot (wraps). */
uint32_t port_ms(void);

/* A fine clock for measuring: on QEMU with -icount shift=0, nanoseconds of virtual time, which
 * is the instruction count; on the host, nanoseconds of CLOCK_MONOTONIC. */
uint64_t port_ns(void);

/* Write n bytes of storage at off (flash erase/program on real hardware). 0 on success. */
int port_flash_write(uint32_t off, const uint8_t *src, uint32_t n);

/* A diagnostic line (no newline needed): the host port's stderr, UART1 on mps2-an385. */
void port_log(const char *text);

#endif
