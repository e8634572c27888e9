/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * cfgdump: sets up a series of devices through the C API (PCI types, BAR
 * flags, standard and extended capabilities), realizes each and prints its
 * whole config space, plus what every set-up call returned.
 *
 * The output depends only on the library's behaviour, so it can be compared
 * between two implementations of libvfio-user.so.0: run.sh runs it against
 * this library and diffs with cfgdump.expected, which holds the output of
 * the same program run against the reference implementation.
 *
 * Output: "== NAME" per device, "call ... = RET [errno]" per set-up call,
 * then "size N" and one line per 16 bytes of config space that are not all
 * zero ("OFFSET: xx xx ...").
 */

#define _GNU_SOURCE

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <vfio-user/libvfio-user.h>

static char sock_dir[] = "/tmp/vfu-cfgdump.XXXXXX";
static int seq;

/* Prints the outcome of a set-up call, errno included when it failed. */
static void
report(const char *what, long ret)
{
    if (ret < 0) {
        printf("call %s = %ld [%s]\n", what, ret, strerrorname_np(errno));
    } else {
        printf("call %s = %ld\n", what, ret);
    }
}

static vfu_ctx_t *
new_ctx(const char *name)
{
    char path[128];
    vfu_ctx_t *ctx;

    printf("== %s\n", name);
    snprintf(path, sizeof(path), "%s/%d.sock", sock_dir, seq++);
    ctx = vfu_create_ctx(VFU_TRANS_SOCK, path, 0, NULL, VFU_DEV_TYPE_PCI);
    if (ctx == NULL) {
        printf("vfu_create_ctx failed: %s\n", strerror(errno));
        exit(1);
    }
    return ctx;
}

static void
region(vfu_ctx_t *ctx, int idx, size_t size, int flags)
{
    char what[64];

    snprintf(what, sizeof(what), "region %d size %#zx flags %#x", idx, size,
             (unsigned)flags);
    report(what, vfu_setup_region(ctx, idx, size, NULL, flags, NULL, 0, -1, 0));
}

static void
cap(vfu_ctx_t *ctx, size_t pos, int flags, const void *data, const char *name)
{
    char what[96];

    snprintf(what, sizeof(what), "cap %s pos %#zx flags %#x", name, pos,
             (unsigned)flags);
    report(what, vfu_pci_add_capability(ctx, pos, flags, (void *)data));
}

/* Realizes the device, prints its config space and destroys it. */
static void
finish(vfu_ctx_t *ctx, size_t size)
{
    const uint8_t *cfg;
    size_t off, i;

    report("realize", vfu_realize_ctx(ctx));
    cfg = (const uint8_t *)vfu_pci_get_config_space(ctx);
    printf("size %#zx\n", size);
    for (off = 0; cfg != NULL && off < size; off += 16) {
        int nonzero = 0;

        for (i = 0; i < 16; i++) {
            nonzero |= cfg[off + i];
        }
        if (!nonzero) {
            continue;
        }
        printf("%03zx:", off);
        for (i = 0; i < 16; i++) {
            printf(" %02x", cfg[off + i]);
        }
        printf("\n");
    }
    vfu_destroy_ctx(ctx);
}

/* ---- capability images (byte layouts from the PCI specifications) ---- */

/* Power management, version 3, D1/D2 supported, PME from D3hot. */
static const uint8_t pm_cap[8] = { 0x01, 0, 0x03, 0x46, 0x08, 0, 0, 0 };
/* MSI: 64-bit, per-vector masking, 4 vectors requested. */
static const uint8_t msi64_cap[24] = { 0x05, 0, 0x84, 0x01 };
/* MSI: 32-bit, one vector. */
static const uint8_t msi32_cap[10] = { 0x05, 0, 0x00, 0x00 };
/* MSI-X: 16 vectors, table in BAR 1 at 0, PBA in BAR 1 at 0x800. */
static const uint8_t msix_cap[12] = {
    0x11, 0, 0x0f, 0x00, 0x01, 0, 0, 0, 0x01, 0x08, 0, 0,
};
/* Vendor specific, 12 bytes. */
static const uint8_t vsc_cap[12] = {
    0x09, 0, 12, 0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4, 5,
};
/* PCI Express v2, endpoint, with some capability bits. */
static const uint8_t px_cap[60] = {
    0x10, 0, 0x02, 0x00,         /* id, next, caps: v2 endpoint */
    0x22, 0x80, 0x00, 0x10,      /* device capabilities */
    0x10, 0x20, 0x00, 0x00,      /* device control / status */
    0x12, 0x0c, 0x41, 0x00,      /* link capabilities */
};
/* Device serial number (extended). */
static const uint8_t dsn_cap[12] = {
    0x03, 0x00, 0x01, 0x00, 0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11,
};
/* Vendor specific extended capability, 16 bytes. */
static const uint8_t evsc_cap[16] = {
    0x0b, 0x00, 0x01, 0x00, 0x34, 0x12, 0x01, 0x01,
    0xa0, 0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7,
};

/* ---- the devices -------------------------------------------------------- */

/* No vfu_pci_init: the default config space of realize. */
static void
dev_bare(void)
{
    vfu_ctx_t *ctx = new_ctx("bare");

    finish(ctx, 256);
}

/* Conventional PCI, no regions at all. */
static void
dev_conventional_empty(void)
{
    vfu_ctx_t *ctx = new_ctx("conventional-empty");

    report("pci_init", vfu_pci_init(ctx, VFU_PCI_TYPE_CONVENTIONAL,
                                    PCI_HEADER_TYPE_NORMAL, 0));
    vfu_pci_set_id(ctx, 0x4e58, 0x0001, 0x1af4, 0x1100);
    vfu_pci_set_class(ctx, 0xff, 0x00, 0x00);
    finish(ctx, 256);
}

/* Every BAR flavour: I/O, 32-bit memory, 64-bit, prefetchable 64-bit, a
 * prefetchable 32-bit one (upstream only warns), a ROM, INTx. */
static void
dev_bar_flags(void)
{
    vfu_ctx_t *ctx = new_ctx("bar-flags");

    report("pci_init", vfu_pci_init(ctx, VFU_PCI_TYPE_CONVENTIONAL,
                                    PCI_HEADER_TYPE_NORMAL, 0));
    vfu_pci_set_id(ctx, 0x1234, 0x5678, 0x9abc, 0xdef0);
    vfu_pci_set_class(ctx, 0x02, 0x00, 0x00);
    region(ctx, VFU_PCI_DEV_BAR0_REGION_IDX, 0x100, VFU_REGION_FLAG_RW);
    region(ctx, VFU_PCI_DEV_BAR1_REGION_IDX, 0x1000,
           VFU_REGION_FLAG_RW | VFU_REGION_FLAG_MEM);
    region(ctx, VFU_PCI_DEV_BAR2_REGION_IDX, 0x100000,
           VFU_REGION_FLAG_RW | VFU_REGION_FLAG_MEM | VFU_REGION_FLAG_64_BITS);
    region(ctx, VFU_PCI_DEV_BAR4_REGION_IDX, 0x40000000,
           VFU_REGION_FLAG_RW | VFU_REGION_FLAG_MEM | VFU_REGION_FLAG_64_BITS |
           VFU_REGION_FLAG_PREFETCH);
    region(ctx, VFU_PCI_DEV_ROM_REGION_IDX, 0x8000, VFU_REGION_FLAG_READ);
    report("irqs intx", vfu_setup_device_nr_irqs(ctx, VFU_DEV_INTX_IRQ, 1));
    finish(ctx, 256);
}

static void
dev_bar_prefetch32(void)
{
    vfu_ctx_t *ctx = new_ctx("bar-prefetch32");

    report("pci_init", vfu_pci_init(ctx, VFU_PCI_TYPE_CONVENTIONAL,
                                    PCI_HEADER_TYPE_NORMAL, 0));
    region(ctx, VFU_PCI_DEV_BAR3_REGION_IDX, 0x2000,
           VFU_REGION_FLAG_RW | VFU_REGION_FLAG_MEM | VFU_REGION_FLAG_PREFETCH);
    region(ctx, VFU_PCI_DEV_BAR5_REGION_IDX, 0x10, VFU_REGION_FLAG_RW);
    report("irqs msi", vfu_setup_device_nr_irqs(ctx, VFU_DEV_MSI_IRQ, 4));
    finish(ctx, 256);
}

/* BAR registers the device filled in before realize. */
static void
dev_bar_preset(void)
{
    vfu_ctx_t *ctx = new_ctx("bar-preset");
    uint8_t *cfg;

    report("pci_init", vfu_pci_init(ctx, VFU_PCI_TYPE_CONVENTIONAL,
                                    PCI_HEADER_TYPE_NORMAL, 0));
    region(ctx, VFU_PCI_DEV_BAR0_REGION_IDX, 0x1000,
           VFU_REGION_FLAG_RW | VFU_REGION_FLAG_MEM | VFU_REGION_FLAG_64_BITS);
    cfg = (uint8_t *)vfu_pci_get_config_space(ctx);
    /* Wrong type bits in BAR0, an address in BAR2, the pin, the status. */
    cfg[0x10] = 0x02;
    cfg[0x19] = 0xe0;
    cfg[0x3c] = 0x0b;
    cfg[0x06] = 0x08;
    finish(ctx, 256);
}

/* Conventional PCI with every standard capability the library knows. */
static void
dev_std_caps(void)
{
    vfu_ctx_t *ctx = new_ctx("std-caps");

    report("pci_init", vfu_pci_init(ctx, VFU_PCI_TYPE_CONVENTIONAL,
                                    PCI_HEADER_TYPE_NORMAL, 0));
    vfu_pci_set_id(ctx, 0x4e58, 0x0002, 0, 0);
    region(ctx, VFU_PCI_DEV_BAR0_REGION_IDX, 0x1000,
           VFU_REGION_FLAG_RW | VFU_REGION_FLAG_MEM);
    region(ctx, VFU_PCI_DEV_BAR1_REGION_IDX, 0x1000,
           VFU_REGION_FLAG_RW | VFU_REGION_FLAG_MEM);
    report("irqs msix", vfu_setup_device_nr_irqs(ctx, VFU_DEV_MSIX_IRQ, 16));
    cap(ctx, 0, 0, pm_cap, "pm");
    cap(ctx, 0, 0, msi64_cap, "msi64");
    cap(ctx, 0, 0, msix_cap, "msix");
    cap(ctx, 0, VFU_CAP_FLAG_READONLY, vsc_cap, "vsc-ro");
    /* A second PM capability is refused. */
    cap(ctx, 0, 0, pm_cap, "pm-again");
    finish(ctx, 256);
}

/* Capabilities at chosen positions, out of order. */
static void
dev_caps_placed(void)
{
    vfu_ctx_t *ctx = new_ctx("caps-placed");

    report("pci_init", vfu_pci_init(ctx, VFU_PCI_TYPE_CONVENTIONAL,
                                    PCI_HEADER_TYPE_NORMAL, 0));
    cap(ctx, 0xc0, 0, msi32_cap, "msi32");
    cap(ctx, 0x60, 0, vsc_cap, "vsc");
    cap(ctx, 0, 0, pm_cap, "pm");
    cap(ctx, 0x20, 0, vsc_cap, "vsc-in-header");
    cap(ctx, 0xfc, 0, pm_cap, "pm-past-end");
    finish(ctx, 256);
}

/* PCI-X mode 1 (256 bytes) and mode 2 (4 KiB) config spaces. */
static void
dev_pcix(void)
{
    vfu_ctx_t *ctx = new_ctx("pci-x-1");

    report("pci_init", vfu_pci_init(ctx, VFU_PCI_TYPE_PCI_X_1,
                                    PCI_HEADER_TYPE_NORMAL, 0));
    vfu_pci_set_id(ctx, 0x8086, 0x1010, 0, 0);
    region(ctx, VFU_PCI_DEV_BAR0_REGION_IDX, 0x20000,
           VFU_REGION_FLAG_RW | VFU_REGION_FLAG_MEM | VFU_REGION_FLAG_64_BITS);
    cap(ctx, 0, 0, pm_cap, "pm");
    finish(ctx, 256);

    ctx = new_ctx("pci-x-2");
    report("pci_init", vfu_pci_init(ctx, VFU_PCI_TYPE_PCI_X_2,
                                    PCI_HEADER_TYPE_NORMAL, 0));
    region(ctx, VFU_PCI_DEV_BAR2_REGION_IDX, 0x400, VFU_REGION_FLAG_RW);
    cap(ctx, 0, 0, msi32_cap, "msi32");
    cap(ctx, 0, VFU_CAP_FLAG_EXTENDED, dsn_cap, "dsn");
    finish(ctx, 4096);
}

/* PCI Express with standard and extended capabilities. */
static void
dev_pcie(void)
{
    vfu_ctx_t *ctx = new_ctx("pcie");

    report("pci_init", vfu_pci_init(ctx, VFU_PCI_TYPE_EXPRESS,
                                    PCI_HEADER_TYPE_NORMAL, 0));
    vfu_pci_set_id(ctx, 0x4e58, 0x0003, 0x4e58, 0x0003);
    vfu_pci_set_class(ctx, 0x01, 0x08, 0x02);
    region(ctx, VFU_PCI_DEV_BAR0_REGION_IDX, 0x4000,
           VFU_REGION_FLAG_RW | VFU_REGION_FLAG_MEM | VFU_REGION_FLAG_64_BITS);
    region(ctx, VFU_PCI_DEV_BAR4_REGION_IDX, 0x2000,
           VFU_REGION_FLAG_RW | VFU_REGION_FLAG_MEM);
    report("irqs msix", vfu_setup_device_nr_irqs(ctx, VFU_DEV_MSIX_IRQ, 16));
    report("irqs intx", vfu_setup_device_nr_irqs(ctx, VFU_DEV_INTX_IRQ, 1));
    cap(ctx, 0, 0, pm_cap, "pm");
    cap(ctx, 0, 0, px_cap, "px");
    cap(ctx, 0, 0, msix_cap, "msix");
    cap(ctx, 0, VFU_CAP_FLAG_EXTENDED, dsn_cap, "dsn");
    cap(ctx, 0, VFU_CAP_FLAG_EXTENDED, evsc_cap, "ext-vsc");
    cap(ctx, 0x200, VFU_CAP_FLAG_EXTENDED, evsc_cap, "ext-vsc-placed");
    finish(ctx, 4096);
}

/* Extended capabilities only, the first one placed away from 0x100. */
static void
dev_pcie_ext_only(void)
{
    vfu_ctx_t *ctx = new_ctx("pcie-ext-only");

    report("pci_init", vfu_pci_init(ctx, VFU_PCI_TYPE_EXPRESS,
                                    PCI_HEADER_TYPE_NORMAL, 0));
    cap(ctx, 0x180, VFU_CAP_FLAG_EXTENDED, dsn_cap, "dsn-placed");
    cap(ctx, 0, VFU_CAP_FLAG_EXTENDED, evsc_cap, "ext-vsc");
    /* Extended capabilities need an extended config space. */
    finish(ctx, 4096);

    ctx = new_ctx("conventional-ext-refused");
    report("pci_init", vfu_pci_init(ctx, VFU_PCI_TYPE_CONVENTIONAL,
                                    PCI_HEADER_TYPE_NORMAL, 0));
    cap(ctx, 0, VFU_CAP_FLAG_EXTENDED, dsn_cap, "dsn");
    finish(ctx, 256);
}

int
main(void)
{
    if (mkdtemp(sock_dir) == NULL) {
        perror("mkdtemp");
        return 1;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    dev_bare();
    dev_conventional_empty();
    dev_bar_flags();
    dev_bar_prefetch32();
    dev_bar_preset();
    dev_std_caps();
    dev_caps_placed();
    dev_pcix();
    dev_pcie();
    dev_pcie_ext_only();
    if (rmdir(sock_dir) != 0) {
        perror("rmdir");
        return 1;
    }
    return 0;
}
