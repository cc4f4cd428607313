# ---- Link and ports: `make board-host`, `make qemu`, `make qemu-size`, `make measure` --------
# Included by firmware/Makefile. Paths are relative to firmware/. The board core is
# firmware/core/*.c; while core/rwkv_board.c is missing, link/link_test_stub.c stands in.
LINK_SRC   := link/rs_wire.c link/rs_link.c link/rs_app.c link/link_core.c
ifneq ($(wildcard core/rwkv_board.c),)
LINK_CORE_SRC := $(wildcard core/*.c)
LINK_CORE_INC := -Icore
else
LINK_CORE_SRC := link/link_test_stub.c
LINK_CORE_INC := -Ilink/stub
endif
LINK_INC   := -Ilink -Iport $(LINK_CORE_INC)
LINK_DEPS  := $(wildcard link/*.h link/stub/*.h core/*.h port/*.h) link/link.mk

# POSIX board: build/board_host --port PTY_PATH|socket://HOST:PORT [--flash FILE] ...
HOST_CC     ?= cc
HOST_CFLAGS ?= -std=c99 -O2 -g -Wall -Wextra -ffp-contract=off -D_DEFAULT_SOURCE
build/board_host: $(LINK_SRC) $(LINK_CORE_SRC) port/host/port_host.c $(LINK_DEPS)
	@mkdir -p $(@D)
	$(HOST_CC) $(HOST_CFLAGS) $(LINK_INC) $(LINK_SRC) $(LINK_CORE_SRC) port/host/port_host.c -o $@ -lm
board-host: build/board_host

# QEMU mps2-an385 (Cortex-M3): build/qemu/fw.elf
ARM_CC     ?= arm-none-eabi-gcc
ARM_SIZE   ?= arm-none-eabi-size
ARM_CFLAGS ?= -std=c99 -O2 -g -Wall -Wextra -ffp-contract=off -mcpu=cortex-m3 -mthumb --specs=picolibc.specs \
              -ffunction-sections -fdata-sections \
              -DRS_LINK_MAX_PAYLOAD=2048 -DRS_LINK_MAX_WINDOW=8 -DRS_STATE_SAVE_MAX=262144
MPS2_SRC   := port/mps2-an385/startup.c port/mps2-an385/port_mps2.c
build/qemu/fw.elf: $(LINK_SRC) $(LINK_CORE_SRC) $(MPS2_SRC) port/mps2-an385/mps2.ld $(LINK_DEPS)
	@mkdir -p $(@D)
	$(ARM_CC) $(ARM_CFLAGS) $(LINK_INC) $(LINK_SRC) $(LINK_CORE_SRC) $(MPS2_SRC) \
	    -nostartfiles -T port/mps2-an385/mps2.ld -Wl,--gc-sections -Wl,-Map=build/qemu/fw.map \
	    -o $@ -lm
qemu: build/qemu/fw.elf
qemu-size: build/qemu/fw.elf
	$(ARM_SIZE) -A build/qemu/fw.elf | grep -E '^(section|\.text|\.data|\.bss|\.stack|Total)'
	$(ARM_SIZE) build/qemu/fw.elf

# text/data/bss, instructions per token under -icount shift=0, install throughput
measure: build/qemu/fw.elf
	cd .. && python firmware/port/mps2-an385/measure.py

.PHONY: board-host qemu qemu-size measure
# ---- end of link and ports ------------------------------------------------------------------
