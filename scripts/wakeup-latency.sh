#!/usr/bin/env bash
# What it costs this machine to wake a sleeping thread: two processes bounce a byte over two
# pipes (two wake-ups per round trip), after pausing a while before each round trip. Every
# message the server relays crosses several such wake-ups at low rates, so this is the floor
# under the latency figures (docs/BENCHMARKS.md, seventh pass).
#
# usage: scripts/wakeup-latency.sh [PAUSE_US...]   (default: 0 50 200 1000 10000)
#   Prints the round trip's p50, p90 and p99 for each pause. Needs a C compiler (cc), which
#   the build already needs for jemalloc.
set -euo pipefail

[ $# -gt 0 ] || set -- 0 50 200 1000 10000
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cat >"$work/pingpong.c" <<'C'
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static double now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

static int by_value(const void *a, const void *b) {
    double d = *(const double *)a - *(const double *)b;
    return (d > 0) - (d < 0);
}

int main(int argc, char **argv) {
    if (argc != 3) return 2;
    int rounds = atoi(argv[1]), pause_us = atoi(argv[2]);
    int ping[2], pong[2];
    char byte = 0;
    if (rounds <= 0 || pipe(ping) || pipe(pong)) return 1;
    pid_t child = fork();
    if (child < 0) return 1;
    if (child == 0) {
        for (int i = 0; i < rounds; i++)
            if (read(ping[0], &byte, 1) != 1 || write(pong[1], &byte, 1) != 1) return 1;
        return 0;
    }
    double *took = malloc(sizeof(double) * rounds);
    if (!took) return 1;
    for (int i = 0; i < rounds; i++) {
        if (pause_us) usleep(pause_us);
        double start = now_us();
        if (write(ping[1], &byte, 1) != 1 || read(pong[0], &byte, 1) != 1) return 1;
        took[i] = now_us() - start;
    }
    qsort(took, rounds, sizeof(double), by_value);
    printf("pause %6d us: round trip p50 %7.1f us, p90 %7.1f us, p99 %7.1f us (%d rounds)\n",
           pause_us, took[rounds / 2], took[rounds * 9 / 10], took[rounds * 99 / 100], rounds);
    return 0;
}
C
cc -O2 -o "$work/pingpong" "$work/pingpong.c"
for pause in "$@"; do
    # About 2 s per pause, and never fewer than 500 round trips.
    rounds=$((2000000 / (pause + 20)))
    [ "$rounds" -ge 500 ] || rounds=500
    "$work/pingpong" "$rounds" "$pause"
done
