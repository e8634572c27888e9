/* SPDX-License-Identifier: BSD-3-Clause */
/* PCI power management capability layout. */

#ifndef LIB_VFIO_USER_PCI_CAPS_PM_H
#define LIB_VFIO_USER_PCI_CAPS_PM_H

#include "common.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Power management capabilities (PMC) register. */
struct pc {
    uint16_t vs:3;         /* spec version */
    uint16_t pmec:1;       /* PME clock */
    uint16_t res:1;
    uint16_t dsi:1;        /* device-specific initialisation */
    uint16_t auxc:3;       /* aux current */
    uint16_t d1s:1;        /* D1 supported */
    uint16_t d2s:1;        /* D2 supported */
    uint16_t psup:5;       /* PME support per state */
} __attribute__((packed));
VFU_STATIC_ASSERT(sizeof(struct pc) == 2, "pc size");

/* Power management control/status (PMCSR) register. */
struct pmcs {
    union {
        uint16_t raw;
        struct {
            uint16_t ps:2;       /* power state D0..D3hot */
            uint16_t res1:1;
            uint16_t nsfrst:1;   /* no soft reset */
            uint16_t res2:4;
            uint16_t pmee:1;     /* PME enable */
            uint16_t dse:4;      /* data select */
            uint16_t dsc:2;      /* data scale */
            uint16_t pmes:1;     /* PME status */
        };
    };
} __attribute__((packed));
VFU_STATIC_ASSERT(sizeof(struct pmcs) == 2, "pmcs size");

struct pmcap {
    struct cap_hdr hdr;
    struct pc pc;
    struct pmcs pmcs;
    uint8_t pmcsr_bse;     /* bridge support extensions */
    uint8_t data;
} __attribute__((packed));
VFU_STATIC_ASSERT(sizeof(struct pmcap) == PCI_PM_SIZEOF, "pmcap size");
VFU_STATIC_ASSERT(offsetof(struct pmcap, hdr) == 0, "pmcap.hdr offset");

#ifdef __cplusplus
}
#endif

#endif /* LIB_VFIO_USER_PCI_CAPS_PM_H */
