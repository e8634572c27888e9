/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * The part of the test device that does not depend on the API form;
 * included once by api2025.c and once by api2026.c, each of which first
 * defines the two functions that do:
 *
 *   static int form_setup_dma(vfu_ctx_t *ctx);
 *       enables DMA with dma_register_cb / dma_unregister_cb (below);
 *   static int form_transfer(vfu_ctx_t *ctx, dma_sg_t *sg, uint8_t *buf);
 *       reads API_XFER_LEN bytes of sg into buf, inverts them and writes
 *       them back; returns 0, or the number of the step that failed with
 *       errno set.
 *
 * Builds as C (gnu99 and later, or C99+ with _GNU_SOURCE) and as C++11+.
 */

#ifndef VFU_API_DEVICE_COMMON_H
#define VFU_API_DEVICE_COMMON_H

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "api_device.h"

struct api_device {
    uint32_t nr_register;
    uint32_t status;
    uint32_t err;
};

static struct api_device api_dev;

static void
dma_register_cb(vfu_ctx_t *ctx, vfu_dma_info_t *info)
{
    (void)ctx;
    (void)info;
    api_dev.nr_register++;
}

static void
dma_unregister_cb(vfu_ctx_t *ctx, vfu_dma_info_t *info)
{
    (void)ctx;
    (void)info;
}

static int form_setup_dma(vfu_ctx_t *ctx);
static int form_transfer(vfu_ctx_t *ctx, dma_sg_t *sg, uint8_t *buf);

static void
run_transfer(vfu_ctx_t *ctx, uint64_t addr)
{
    uint8_t buf[API_XFER_LEN];
    /* Room for two entries: the 2025 form also tries a count of 2. */
    dma_sg_t *sg = (dma_sg_t *)calloc(2, dma_sg_size());
    int n;

    if (sg == NULL) {
        api_dev.status = 100;
        api_dev.err = ENOMEM;
        return;
    }
    n = vfu_addr_to_sgl(ctx, (vfu_dma_addr_t)(uintptr_t)addr, API_XFER_LEN,
                        sg, 1, PROT_READ | PROT_WRITE);
    if (n != 1) {
        api_dev.status = 101;
        api_dev.err = (uint32_t)errno;
    } else {
        int step = form_transfer(ctx, sg, buf);
        if (step != 0) {
            api_dev.status = (uint32_t)step;
            api_dev.err = (uint32_t)errno;
        }
    }
    free(sg);
}

static ssize_t
bar0_cb(vfu_ctx_t *ctx, char *buf, size_t count, loff_t offset, bool is_write)
{
    uint32_t v;

    if (is_write && offset == API_OFF_DMA && count == 8) {
        uint64_t addr;
        memcpy(&addr, buf, 8);
        run_transfer(ctx, addr);
        return (ssize_t)count;
    }
    if (is_write || count != 4) {
        errno = EINVAL;
        return -1;
    }
    switch (offset) {
    case API_OFF_NREG:
        v = api_dev.nr_register;
        break;
    case API_OFF_STATUS:
        v = api_dev.status;
        break;
    case API_OFF_ERRNO:
        v = api_dev.err;
        break;
    default:
        errno = EINVAL;
        return -1;
    }
    memcpy(buf, &v, 4);
    return 4;
}

static void
log_cb(vfu_ctx_t *ctx, int level, const char *msg)
{
    (void)ctx;
    fprintf(stderr, "libvfio-user[%d]: %s\n", level, msg);
}

#define API_CHECK(call)                                                       \
    do {                                                                      \
        if ((call) != 0) {                                                    \
            fprintf(stderr, "%s failed: %s\n", #call, strerror(errno));       \
            vfu_destroy_ctx(ctx);                                             \
            return 1;                                                         \
        }                                                                     \
    } while (0)

int
api_device_main(const char *path)
{
    vfu_ctx_t *ctx = vfu_create_ctx(VFU_TRANS_SOCK, path, 0, NULL,
                                    VFU_DEV_TYPE_PCI);

    if (ctx == NULL) {
        fprintf(stderr, "vfu_create_ctx failed: %s\n", strerror(errno));
        return 1;
    }
    if (getenv("VFU_TEST_LOG") != NULL) {
        API_CHECK(vfu_setup_log(ctx, log_cb, LOG_DEBUG));
    }
    API_CHECK(vfu_pci_init(ctx, VFU_PCI_TYPE_CONVENTIONAL,
                           PCI_HEADER_TYPE_NORMAL, 0));
    API_CHECK(vfu_setup_region(ctx, VFU_PCI_DEV_BAR0_REGION_IDX, API_BAR0_SIZE,
                               bar0_cb, VFU_REGION_FLAG_RW, NULL, 0, -1, 0));
    API_CHECK(form_setup_dma(ctx));
    API_CHECK(vfu_realize_ctx(ctx));
    API_CHECK(vfu_attach_ctx(ctx));
    while (vfu_run_ctx(ctx) >= 0) {
    }
    if (errno != ENOTCONN) {
        fprintf(stderr, "vfu_run_ctx failed: %s\n", strerror(errno));
        vfu_destroy_ctx(ctx);
        return 1;
    }
    vfu_destroy_ctx(ctx);
    return 0;
}

#endif /* VFU_API_DEVICE_COMMON_H */
