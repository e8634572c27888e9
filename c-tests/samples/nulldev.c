/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * nulldev: about the smallest vfio-user device that is still useful.
 *
 * A conventional PCI function with one 4 KiB memory BAR (BAR0) that reads
 * as zeroes and ignores writes. It serves a single client and exits with
 * status 0 once that client disconnects.
 *
 * Usage: nulldev SOCKET
 */

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "libvfio-user.h"

#define NULLDEV_VENDOR  0x4e58
#define NULLDEV_DEVICE  0x0010
#define NULLDEV_BAR0_SZ 0x1000

static ssize_t
bar0_access(vfu_ctx_t *ctx, char *buf, size_t count, loff_t offset,
            bool is_write)
{
    (void)ctx;
    (void)offset;
    /* The library has already checked offset + count against the BAR. */
    if (!is_write) {
        memset(buf, 0, count);
    }
    return (ssize_t)count;
}

static void
log_stderr(vfu_ctx_t *ctx, int level, const char *msg)
{
    (void)ctx;
    fprintf(stderr, "nulldev[%d]: %s\n", level, msg);
}

static int
fail(vfu_ctx_t *ctx, const char *what)
{
    fprintf(stderr, "nulldev: %s: %s\n", what, strerror(errno));
    vfu_destroy_ctx(ctx);
    return EXIT_FAILURE;
}

int
main(int argc, char *argv[])
{
    vfu_ctx_t *ctx;

    if (argc != 2) {
        fprintf(stderr, "usage: %s SOCKET\n", argv[0]);
        return EXIT_FAILURE;
    }

    ctx = vfu_create_ctx(VFU_TRANS_SOCK, argv[1], 0, NULL, VFU_DEV_TYPE_PCI);
    if (ctx == NULL) {
        fprintf(stderr, "nulldev: cannot create context on %s: %s\n",
                argv[1], strerror(errno));
        return EXIT_FAILURE;
    }
    if (vfu_setup_log(ctx, log_stderr, LOG_ERR) < 0) {
        return fail(ctx, "vfu_setup_log");
    }
    if (vfu_pci_init(ctx, VFU_PCI_TYPE_CONVENTIONAL, PCI_HEADER_TYPE_NORMAL,
                     0) < 0) {
        return fail(ctx, "vfu_pci_init");
    }
    vfu_pci_set_id(ctx, NULLDEV_VENDOR, NULLDEV_DEVICE, 0, 0);
    vfu_pci_set_class(ctx, 0xff, 0x00, 0x00);
    if (vfu_setup_region(ctx, VFU_PCI_DEV_BAR0_REGION_IDX, NULLDEV_BAR0_SZ,
                         bar0_access, VFU_REGION_FLAG_RW | VFU_REGION_FLAG_MEM,
                         NULL, 0, -1, 0) < 0) {
        return fail(ctx, "vfu_setup_region");
    }
    if (vfu_realize_ctx(ctx) < 0) {
        return fail(ctx, "vfu_realize_ctx");
    }
    if (vfu_attach_ctx(ctx) < 0) {
        return fail(ctx, "vfu_attach_ctx");
    }

    /* A blocking context serves requests until something goes wrong. */
    for (;;) {
        if (vfu_run_ctx(ctx) < 0) {
            if (errno == EINTR) {
                continue;
            }
            if (errno == ENOTCONN) {
                break;
            }
            return fail(ctx, "vfu_run_ctx");
        }
    }

    vfu_destroy_ctx(ctx);
    return EXIT_SUCCESS;
}
