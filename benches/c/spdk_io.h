/* SPDX-License-Identifier: BSD-3-Clause */
/* What the parts of the spdk_io benchmark share (see spdk_io.c). */

#ifndef SPDK_IO_H
#define SPDK_IO_H

#define _GNU_SOURCE /* memfd_create, pthread_setaffinity_np */
#include <dlfcn.h>
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <vfio-user/libvfio-user.h>

#define MAX_LIBS 4
#define MAX_REGIONS 64
#define IO_SIZE 4096
/* Distinct addresses an I/O loop cycles through (16 MiB of buffers). */
#define NR_ADDRS 4096
#define MIG_CHUNK (1u << 20)

/* Rounds per row, and I/Os per library (and floor) per round. */
extern int rounds;
extern uint64_t ios_per_round;

/* A library under test, opened with dlopen. */
struct lib {
    const char *path;
    const char *name;
    void *handle;
    __typeof__(&vfu_create_ctx) create_ctx;
    __typeof__(&vfu_pci_init) pci_init;
    __typeof__(&vfu_setup_device_dma) setup_device_dma;
    __typeof__(&vfu_setup_device_migration_callbacks) setup_migration;
    __typeof__(&vfu_realize_ctx) realize_ctx;
    __typeof__(&vfu_attach_ctx) attach_ctx;
    __typeof__(&vfu_run_ctx) run_ctx;
    __typeof__(&vfu_destroy_ctx) destroy_ctx;
    __typeof__(&vfu_addr_to_sgl) addr_to_sgl;
    __typeof__(&vfu_sgl_get) sgl_get;
    __typeof__(&vfu_sgl_put) sgl_put;
    __typeof__(&dma_sg_size) sg_size;
};

extern struct lib libs[MAX_LIBS];
extern int nr_libs;

/* Median, min and max of n samples. */
struct stat3 {
    double med, min, max;
};

/* bench_util.c */
void die(const char *what) __attribute__((noreturn));
uint64_t now_ns(void);
void pin(int cpu);
struct stat3 stats(double *v, int n);
void load(struct lib *l, const char *arg);
int send_msg(int sock, uint16_t cmd, const void *body, size_t len, int fd);
ssize_t recv_reply(int sock, void *body, size_t cap);
int call(int sock, uint16_t cmd, const void *body, size_t len, int fd);
int connect_to(const char *path);
int send_version(int sock);
int set_mig_state(int sock, uint32_t state);
void print_header(void);
void report(const char *row, const char *lib, double *v, double *extra, double *calls, int n);
/* Per library, calls-only time beyond the stub's; per library after the
 * first, the first's time over its own, paired round by round. Computed
 * before report() sorts the arrays, printed by print_paired(). */
void report_paired(double calls[][64], const double *stub, int n, int nlibs);
void print_paired(void);

/* mig_read.c */
void bench_mig(void);

#endif /* SPDK_IO_H */
