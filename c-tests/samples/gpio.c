/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * gpio: a 16-in/16-out GPIO card in the spirit of the ACCES PCI-IDIO-16
 * (PCI ID 494f:0dc8), with a port-I/O BAR2 of 256 bytes.
 *
 * Register model (all registers are 8 bits wide; an access of several bytes
 * is handled byte by byte):
 *   0x0  RW  outputs 0-7   (reads give back what was last written)
 *   0x1  RO  inputs 0-7
 *   0x4  RW  outputs 8-15
 *   0x5  RO  inputs 8-15
 *   anything else reads as 0; writes there are ignored.
 *
 * The input lines are not wired to anything, so they are simulated: every
 * read of an input register returns the bank's current state and then
 * inverts all 8 lines of that bank (so a bank reads 0x00, 0xff, 0x00, ...).
 *
 * Every output change is logged at LOG_INFO through vfu_setup_log(); input
 * reads are logged at LOG_DEBUG (shown with -v).
 *
 * Serves one client and exits with status 0 once it disconnects.
 *
 * Usage: gpio [-v] SOCKET
 */

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "libvfio-user.h"

#define GPIO_VENDOR  0x494f
#define GPIO_DEVICE  0x0dc8
#define GPIO_BAR2_SZ 0x100

#define REG_OUT_LO 0x0
#define REG_IN_LO  0x1
#define REG_OUT_HI 0x4
#define REG_IN_HI  0x5

struct gpio_card {
    uint8_t out[2]; /* [0]: pins 0-7, [1]: pins 8-15 */
    uint8_t in[2];
};

static void
log_stderr(vfu_ctx_t *ctx, int level, const char *msg)
{
    (void)ctx;
    (void)level;
    fprintf(stderr, "gpio: %s\n", msg);
}

static uint8_t
reg_read(vfu_ctx_t *ctx, struct gpio_card *card, uint64_t reg)
{
    uint8_t v;
    int bank;

    switch (reg) {
    case REG_OUT_LO:
    case REG_OUT_HI:
        return card->out[reg == REG_OUT_HI];
    case REG_IN_LO:
    case REG_IN_HI:
        bank = reg == REG_IN_HI;
        v = card->in[bank];
        card->in[bank] = (uint8_t)~v;
        vfu_log(ctx, LOG_DEBUG, "inputs %d-%d read as 0x%02x", bank * 8,
                bank * 8 + 7, v);
        return v;
    default:
        return 0;
    }
}

static void
reg_write(vfu_ctx_t *ctx, struct gpio_card *card, uint64_t reg, uint8_t v)
{
    int bank;

    if (reg != REG_OUT_LO && reg != REG_OUT_HI) {
        vfu_log(ctx, LOG_DEBUG, "write of 0x%02x to register %#lx ignored", v,
                (unsigned long)reg);
        return;
    }
    bank = reg == REG_OUT_HI;
    if (card->out[bank] != v) {
        vfu_log(ctx, LOG_INFO, "outputs %d-%d: 0x%02x -> 0x%02x", bank * 8,
                bank * 8 + 7, card->out[bank], v);
    }
    card->out[bank] = v;
}

static ssize_t
bar2_access(vfu_ctx_t *ctx, char *buf, size_t count, loff_t offset,
            bool is_write)
{
    struct gpio_card *card = vfu_get_private(ctx);
    size_t i;

    /* The library has already checked offset + count against the BAR. */
    for (i = 0; i < count; i++) {
        uint64_t reg = (uint64_t)offset + i;

        if (is_write) {
            reg_write(ctx, card, reg, (uint8_t)buf[i]);
        } else {
            buf[i] = (char)reg_read(ctx, card, reg);
        }
    }
    return (ssize_t)count;
}

static int
fail(vfu_ctx_t *ctx, const char *what)
{
    fprintf(stderr, "gpio: %s: %s\n", what, strerror(errno));
    vfu_destroy_ctx(ctx);
    return EXIT_FAILURE;
}

int
main(int argc, char *argv[])
{
    struct gpio_card card;
    int level = LOG_INFO;
    vfu_ctx_t *ctx;
    int opt;

    while ((opt = getopt(argc, argv, "v")) != -1) {
        if (opt == 'v') {
            level = LOG_DEBUG;
        } else {
            fprintf(stderr, "usage: %s [-v] SOCKET\n", argv[0]);
            return EXIT_FAILURE;
        }
    }
    if (optind != argc - 1) {
        fprintf(stderr, "usage: %s [-v] SOCKET\n", argv[0]);
        return EXIT_FAILURE;
    }

    memset(&card, 0, sizeof(card));
    ctx = vfu_create_ctx(VFU_TRANS_SOCK, argv[optind], 0, &card,
                         VFU_DEV_TYPE_PCI);
    if (ctx == NULL) {
        fprintf(stderr, "gpio: cannot create context on %s: %s\n",
                argv[optind], strerror(errno));
        return EXIT_FAILURE;
    }
    if (vfu_setup_log(ctx, log_stderr, level) < 0) {
        return fail(ctx, "vfu_setup_log");
    }
    if (vfu_pci_init(ctx, VFU_PCI_TYPE_CONVENTIONAL, PCI_HEADER_TYPE_NORMAL,
                     0) < 0) {
        return fail(ctx, "vfu_pci_init");
    }
    vfu_pci_set_id(ctx, GPIO_VENDOR, GPIO_DEVICE, 0, 0);
    /* Flags without VFU_REGION_FLAG_MEM make this an I/O BAR. */
    if (vfu_setup_region(ctx, VFU_PCI_DEV_BAR2_REGION_IDX, GPIO_BAR2_SZ,
                         bar2_access, VFU_REGION_FLAG_RW, NULL, 0, -1, 0) < 0) {
        return fail(ctx, "vfu_setup_region");
    }
    if (vfu_setup_device_nr_irqs(ctx, VFU_DEV_INTX_IRQ, 1) < 0) {
        return fail(ctx, "vfu_setup_device_nr_irqs");
    }
    if (vfu_realize_ctx(ctx) < 0) {
        return fail(ctx, "vfu_realize_ctx");
    }
    vfu_log(ctx, LOG_INFO, "waiting for a client on %s", argv[optind]);
    if (vfu_attach_ctx(ctx) < 0) {
        return fail(ctx, "vfu_attach_ctx");
    }
    vfu_log(ctx, LOG_INFO, "client attached");

    for (;;) {
        if (vfu_run_ctx(ctx) < 0) {
            if (errno == EINTR) {
                continue;
            }
            if (errno == ENOTCONN) {
                vfu_log(ctx, LOG_INFO, "client disconnected");
                break;
            }
            return fail(ctx, "vfu_run_ctx");
        }
    }

    vfu_destroy_ctx(ctx);
    return EXIT_SUCCESS;
}
