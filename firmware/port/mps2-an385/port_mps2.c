/* Port for QEMU's mps2-an385 (Cortex-M3, 25 MHz SYSCLK): the link on CMSDK APB UART0
 * (0x40004000, polled), diagnostics on UART1 (0x40005000), a millisecond clock from SysTick,
 * storage in the 16 MiB PSRAM at 0x21000000 (install record in its first 4 KiB, the stream
 * after it: a stream can be pre-loaded there with -device loader), the model arena in SSRAM2.
 *
 * Under `-icount shift=0` QEMU's virtual clock advances 1 ns per instruction, so port_ns()
 * (SysTick-based) counts instructions. */
#include <stdint.h>
#include <string.h>

#include "rs_app.h"
#include "rs_port.h"

#define UART0 0x40004000u
#define UART1 0x40005000u
#define REG(a) (*(volatile uint32_t *)(a))
#define UART_DATA(u) REG((u) + 0x00)
#define UART_STATE(u) REG((u) + 0x04)
#define UART_CTRL(u) REG((u) + 0x08)
#define UART_BAUDDIV(u) REG((u) + 0x10)
#define STATE_TXFULL 1u
#define STATE_RXFULL 2u

#define SYST_CSR REG(0xE000E010u)
#define SYST_RVR REG(0xE000E014u)
#define SYST_CVR REG(0xE000E018u)
#define SYSCLK_HZ 25000000u
#define TICKS_PER_MS (SYSCLK_HZ / 1000u)

#define PSRAM ((uint8_t *)0x21000000u)
#define PSRAM_SIZE (16u << 20)

#ifndef MPS2_ARENA
#define MPS2_ARENA (2u << 20)
#endif

static uint8_t arena[MPS2_ARENA] __attribute__((aligned(16)));
static volatile uint32_t ms_now;

void SysTick_Handler(void) { ms_now++; }

int port_init(int argc, char **argv, rs_port_info *info) {
    (void)argc, (void)argv;
    UART_BAUDDIV(UART0) = SYSCLK_HZ / 115200u;
    UART_CTRL(UART0) = 3;                              /* TX and RX enabled, no interrupts */
    UART_BAUDDIV(UART1) = SYSCLK_HZ / 115200u;
    UART_CTRL(UART1) = 1;
    SYST_RVR = TICKS_PER_MS - 1;
    SYST_CVR = 0;
    SYST_CSR = 7;                                      /* processor clock, interrupt, enable */
    memset(info, 0, sizeof *info);
    info->name = "mps2-an385";
    info->flash = PSRAM;
    info->flash_size = PSRAM_SIZE;
    info->arena = arena;
    info->arena_size = sizeof arena;
    info->chunk = 4096;
    info->max_payload = 2048;
    info->window = 4;
    info->timeout_baud = 115200;   /* QEMU carries ~15-20 KB/s towards the board */
    info->live = 1;
    return 0;
}

int port_connect(void) { return 0; }

int port_read(uint8_t *buf, uint32_t max, uint32_t wait_ms) {
    uint32_t n = 0, start = ms_now, idle = 0;
    for (;;) {
        if (UART_STATE(UART0) & STATE_RXFULL) {
            buf[n++] = (uint8_t)UART_DATA(UART0);
            idle = 0;
            if (n == max) return (int)n;
            continue;
        }
        if (n) {
            if (++idle > 64) return (int)n;            /* a gap: hand over what came */
        } else if (ms_now - start >= wait_ms) {
            return 0;
        }
    }
}

int port_write(const uint8_t *buf, uint32_t n) {
    while (n--) {
        while (UART_STATE(UART0) & STATE_TXFULL) {
        }
        UART_DATA(UART0) = *buf++;
    }
    return 0;
}

int port_set_baud(uint32_t baud) {
    while (UART_STATE(UART0) & STATE_TXFULL) {
    }
    uint32_t div = SYSCLK_HZ / (baud ? baud : 115200u);
    UART_BAUDDIV(UART0) = div < 16 ? 16 : div;         /* QEMU ignores the rate itself */
    return 0;
}

uint32_t port_ms(void) { return ms_now; }

uint64_t port_ns(void) {
    uint32_t ms, cvr;
    do {
        ms = ms_now;
        cvr = SYST_CVR;
    } while (ms != ms_now);
    /* 25 MHz: 40 ns per tick */
    return (uint64_t)ms * 1000000u + (uint64_t)(TICKS_PER_MS - 1 - cvr) * 40u;
}

int port_flash_write(uint32_t off, const uint8_t *src, uint32_t n) {
    if ((uint64_t)off + n > PSRAM_SIZE) return -1;
    memcpy(PSRAM + off, src, n);
    return 0;
}

void port_log(const char *text) {
    while (*text) {
        while (UART_STATE(UART1) & STATE_TXFULL) {
        }
        UART_DATA(UART1) = (uint8_t)*text++;
    }
    while (UART_STATE(UART1) & STATE_TXFULL) {
    }
    UART_DATA(UART1) = '\n';
}

int main(void) { return rs_app_main(0, 0); }
