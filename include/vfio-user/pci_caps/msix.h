/* SPDX-License-Identifier: BSD-3-Clause */
/* MSI-X capability layout. */

#ifndef LIB_VFIO_USER_PCI_CAPS_MSIX_H
#define LIB_VFIO_USER_PCI_CAPS_MSIX_H

#include <stdint.h>

#include <linux/pci_regs.h>

#include "common.h"

#ifdef __cplusplus
extern "C" {
#endif

/* MSI-X message control register. */
struct mxc {
    uint16_t ts:11;        /* table size minus one (RO) */
    uint16_t reserved:3;   /* always zero */
    uint16_t fm:1;         /* function mask (RW) */
    uint16_t mxe:1;        /* MSI-X enable (RW) */
} __attribute__((packed));
VFU_STATIC_ASSERT(sizeof(struct mxc) == PCI_MSIX_FLAGS, "mxc size");

/* Table offset and BAR indicator (RO). */
struct mtab {
    uint32_t tbir:3;
    uint32_t to:29;
} __attribute__((packed));
VFU_STATIC_ASSERT(sizeof(struct mtab) == PCI_MSIX_TABLE, "mtab size");

/* Pending bit array offset and BAR indicator (RO). */
struct mpba {
    uint32_t pbir:3;
    uint32_t pbao:29;
} __attribute__((packed));
VFU_STATIC_ASSERT(sizeof(struct mpba) == PCI_MSIX_PBA - PCI_MSIX_TABLE,
                  "mpba size");

struct msixcap {
    struct cap_hdr hdr;
    struct mxc mxc;
    struct mtab mtab;
    struct mpba mpba;
} __attribute__((packed)) __attribute__((aligned(4)));
VFU_STATIC_ASSERT(sizeof(struct msixcap) == PCI_CAP_MSIX_SIZEOF,
                  "msixcap size");
VFU_STATIC_ASSERT(offsetof(struct msixcap, hdr) == 0, "msixcap.hdr offset");

#ifdef __cplusplus
}
#endif

#endif /* LIB_VFIO_USER_PCI_CAPS_MSIX_H */
