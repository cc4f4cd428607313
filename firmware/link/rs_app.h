/* The board firmware's entry point and counters; a port's main() calls rs_app_main. */
#ifndef RS_APP_H
#define RS_APP_H

#include <stdint.h>

typedef struct rs_app_stats {
    uint32_t installs, evals, aborted_passes, install_ms, live_reads;
    uint64_t install_bytes, eval_tokens, eval_ns, live_bytes;
} rs_app_stats;
extern rs_app_stats app_stats;

int rs_app_main(int argc, char **argv);

#endif
