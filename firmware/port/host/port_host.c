/* POSIX port: the board firmware as a process. `board_host --port URL`: a tty or pty path
 * (opened raw), or socket://HOST:PORT, where it listens and serves one host connection after
 * another (like `rwkv-stream board-sim`). Storage is a file (--flash FILE, memory-mapped; the
 * same layout as board-sim's flash file), RAM a heap block (--ram). */
#ifndef _DEFAULT_SOURCE
#define _DEFAULT_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#include "rs_app.h"
#include "rs_port.h"

static int fd = -1, listen_fd = -1, is_tty;
static const char *path;
static int verbose;
static uint8_t *flash_mem;
static uint32_t flash_len;

static void usage(void) {
    fprintf(stderr,
            "usage: board_host --port PATH|socket://HOST:PORT [--flash FILE] [--flash-size N]\n"
            "       [--ram N] [--psram N] [--chunk N] [--max-frame N] [--window N] [--name S]\n"
            "       [--baud B] [--reply-ms MS] [--no-live] [-v]\n");
}

static int open_listener(const char *url) {
    char host[256];
    const char *hp = url + strlen("socket://");
    const char *colon = strrchr(hp, ':');
    if (!colon) return -1;
    size_t hl = (size_t)(colon - hp);
    if (hl >= sizeof host) return -1;
    memcpy(host, hp, hl);
    host[hl] = 0;
    struct addrinfo hints = {0}, *ai;
    hints.ai_family = AF_INET;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE;
    if (getaddrinfo(hl ? host : NULL, colon + 1, &hints, &ai)) return -1;
    int s = socket(ai->ai_family, ai->ai_socktype, 0);
    int one = 1;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (s < 0 || bind(s, ai->ai_addr, ai->ai_addrlen) || listen(s, 1)) {
        freeaddrinfo(ai);
        return -1;
    }
    freeaddrinfo(ai);
    struct sockaddr_in got;
    socklen_t gl = sizeof got;
    getsockname(s, (struct sockaddr *)&got, &gl);
    fprintf(stderr, "board_host: listening on port %d\n", ntohs(got.sin_port));
    return s;
}

static int open_tty(void) {
    int f = open(path, O_RDWR | O_NOCTTY);
    if (f < 0) return -1;
    struct termios t;
    if (tcgetattr(f, &t) == 0) {
        cfmakeraw(&t);
        cfsetspeed(&t, B921600);
        tcsetattr(f, TCSANOW, &t);
    }
    return f;
}

int port_init(int argc, char **argv, rs_port_info *info) {
    const char *flash_path = 0;
    uint64_t flash_size = 64u << 20, ram = 8u << 20;
    memset(info, 0, sizeof *info);
    info->name = "host";
    info->chunk = 4096;
    info->max_payload = 4096;
    info->window = 8;
    info->timeout_baud = 921600;
    info->live = 1;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : 0;
        if (!strcmp(a, "-v")) { verbose = 1; continue; }
        if (!strcmp(a, "--no-live")) { info->live = 0; continue; }
        if (!v) { usage(); return 1; }
        i++;
        if (!strcmp(a, "--port")) path = v;
        else if (!strcmp(a, "--flash")) flash_path = v;
        else if (!strcmp(a, "--flash-size")) flash_size = strtoull(v, 0, 0);
        else if (!strcmp(a, "--ram")) ram = strtoull(v, 0, 0);
        else if (!strcmp(a, "--psram")) info->psram = (uint32_t)strtoul(v, 0, 0);
        else if (!strcmp(a, "--chunk")) info->chunk = (uint32_t)strtoul(v, 0, 0);
        else if (!strcmp(a, "--max-frame")) info->max_payload = (uint32_t)strtoul(v, 0, 0);
        else if (!strcmp(a, "--window")) info->window = (uint32_t)strtoul(v, 0, 0);
        else if (!strcmp(a, "--name")) info->name = v;
        else if (!strcmp(a, "--baud")) info->timeout_baud = (uint32_t)strtoul(v, 0, 0);
        else if (!strcmp(a, "--reply-ms")) info->reply_ms = (uint32_t)strtoul(v, 0, 0);
        else { usage(); return 1; }
    }
    if (!path) { usage(); return 1; }
    signal(SIGPIPE, SIG_IGN);
    if (flash_path) {
        int f = open(flash_path, O_RDWR | O_CREAT, 0644);
        if (f < 0 || ftruncate(f, (off_t)flash_size)) {
            fprintf(stderr, "board_host: cannot open flash file %s: %s\n", flash_path, strerror(errno));
            return 1;
        }
        void *m = mmap(0, flash_size, PROT_READ | PROT_WRITE, MAP_SHARED, f, 0);
        if (m == MAP_FAILED) { perror("board_host: mmap"); return 1; }
        info->flash = m;
        info->flash_size = (uint32_t)flash_size;
        flash_mem = m;
        flash_len = (uint32_t)flash_size;
    }
    void *arena = 0;
    if (posix_memalign(&arena, 64, (size_t)ram)) arena = 0;
    info->arena = arena;
    info->arena_size = (uint32_t)ram;
    if (!info->arena) { fprintf(stderr, "board_host: no memory for --ram\n"); return 1; }
    if (!strncmp(path, "socket://", 9)) {
        listen_fd = open_listener(path);
        if (listen_fd < 0) {
            fprintf(stderr, "board_host: cannot listen on %s: %s\n", path, strerror(errno));
            return 1;
        }
    } else {
        is_tty = 1;
        fd = open_tty();
        if (fd < 0) {
            fprintf(stderr, "board_host: cannot open %s: %s\n", path, strerror(errno));
            return 1;
        }
        fprintf(stderr, "board_host: ready on %s\n", path);
    }
    return 0;
}

int port_connect(void) {
    if (is_tty) {
        if (fd < 0) {
            usleep(100000);
            fd = open_tty();
        }
        return 0;
    }
    if (fd >= 0) close(fd);
    fd = accept(listen_fd, 0, 0);
    if (fd < 0) return -1;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (verbose) fprintf(stderr, "board_host: host connected\n");
    return 0;
}

static int lost(void) {
    if (fd >= 0) close(fd);
    fd = -1;
    return -1;
}

int port_read(uint8_t *buf, uint32_t max, uint32_t wait_ms) {
    if (fd < 0) return -1;
    struct pollfd p = {fd, POLLIN, 0};
    int r = poll(&p, 1, (int)wait_ms);
    if (r <= 0) return 0;
    if (p.revents & POLLIN) {
        ssize_t n = read(fd, buf, max);
        if (n > 0) return (int)n;
        if (n < 0 && (errno == EAGAIN || errno == EINTR)) return 0;
        return lost();
    }
    if (p.revents & (POLLHUP | POLLERR | POLLNVAL)) {
        if (is_tty) { usleep(wait_ms * 1000); return 0; }   /* a pty with no peer yet */
        return lost();
    }
    return 0;
}

int port_write(const uint8_t *buf, uint32_t n) {
    while (n) {
        if (fd < 0) return -1;
        ssize_t w = write(fd, buf, n);
        if (w < 0) {
            if (errno == EINTR || errno == EAGAIN) continue;
            return lost();
        }
        buf += w;
        n -= (uint32_t)w;
    }
    return 0;
}

int port_set_baud(uint32_t baud) {
    if (is_tty && fd >= 0) {
        tcdrain(fd);
        struct termios t;
        if (tcgetattr(fd, &t) == 0) {
            speed_t s = baud >= 921600 ? B921600 : baud >= 460800 ? B460800 : baud >= 230400 ? B230400
                      : baud >= 115200 ? B115200 : baud >= 57600 ? B57600 : B9600;
            cfsetspeed(&t, s);
            tcsetattr(fd, TCSANOW, &t);
        }
    }
    return 0;
}

uint32_t port_ms(void) { return (uint32_t)(port_ns() / 1000000u); }

uint64_t port_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

int port_flash_write(uint32_t off, const uint8_t *src, uint32_t n) {
    if ((uint64_t)off + n > flash_len) return -1;
    memcpy(flash_mem + off, src, n);         /* MAP_SHARED: the file holds it */
    return 0;
}

void port_log(const char *text) {
    if (verbose || !strncmp(text, "board ready", 11)) fprintf(stderr, "board_host: %s\n", text);
}

int main(int argc, char **argv) { return rs_app_main(argc, argv); }
