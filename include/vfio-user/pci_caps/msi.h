/* SPDX-License-Identifier: BSD-3-Clause */
/* MSI capability layout. */

#ifndef LIB_VFIO_USER_PCI_CAPS_MSI_H
#define LIB_VFIO_USER_PCI_CAPS_MSI_H

#include "common.h"

#ifdef __cplusplus
extern "C" {
#endif

/* MSI message control register. */
struct mc {
    unsigned int msie:1;   /* MSI enable (RW) */
    unsigned int mmc:3;    /* multiple message capable (RO) */
    unsigned int mme:3;    /* multiple message enable (RW) */
    unsigned int c64:1;    /* 64-bit address capable (RO) */
    unsigned int pvm:1;    /* per-vector masking capable (RO) */
    unsigned int res1:7;   /* extended message data bits, unsupported */
} __attribute__((packed));
VFU_STATIC_ASSERT(sizeof(struct mc) == 2, "mc size");

/* MSI message address register (low dword). */
struct ma {
    unsigned int res1:2;   /* always zero */
    unsigned int addr:30;  /* dword-aligned address (RW) */
} __attribute__((packed));
VFU_STATIC_ASSERT(sizeof(struct ma) == 4, "ma size");

/* Size of the largest (64-bit, per-vector masking) MSI capability. */
#define VFIO_USER_PCI_CAP_MSI_SIZEOF (0x18)

struct msicap {
    struct cap_hdr hdr;
    struct mc mc;
    struct ma ma;
    uint32_t mua;          /* upper address dword (RW) */
    uint16_t md;           /* message data (RW) */
    uint16_t padding;      /* extended message data, unsupported */
    uint32_t mmask;        /* mask bits (RW) */
    uint32_t mpend;        /* pending bits (RO) */
} __attribute__((packed));
VFU_STATIC_ASSERT(sizeof(struct msicap) == VFIO_USER_PCI_CAP_MSI_SIZEOF,
                  "msicap size");
VFU_STATIC_ASSERT(offsetof(struct msicap, hdr) == 0, "msicap.hdr offset");

#ifdef __cplusplus
}
#endif

#endif /* LIB_VFIO_USER_PCI_CAPS_MSI_H */
