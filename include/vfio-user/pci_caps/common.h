/* SPDX-License-Identifier: BSD-3-Clause */
/* Headers shared by all PCI / PCI Express capability layouts. */

#ifndef LIB_VFIO_USER_PCI_CAPS_COMMON_H
#define LIB_VFIO_USER_PCI_CAPS_COMMON_H

#include <linux/pci_regs.h>
#include <stddef.h>
#include <stdint.h>

/* Compile-time layout check for C11 and C++11+ (a no-op for older C++). */
#ifndef VFU_STATIC_ASSERT
# if defined(__cplusplus) && __cplusplus >= 201103L
#  define VFU_STATIC_ASSERT(expr, why) static_assert(expr, why)
# elif defined(__cplusplus)
#  define VFU_STATIC_ASSERT(expr, why) /* no static_assert before C++11 */
# else
#  define VFU_STATIC_ASSERT(expr, why) _Static_assert(expr, why)
# endif
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* The two bytes every conventional capability starts with. */
struct cap_hdr {
    uint8_t id;      /* PCI_CAP_ID_* */
    uint8_t next;    /* config space offset of the next capability, or 0 */
} __attribute__((packed));
VFU_STATIC_ASSERT(sizeof(struct cap_hdr) == 2, "cap_hdr size");
VFU_STATIC_ASSERT(offsetof(struct cap_hdr, id) == PCI_CAP_LIST_ID,
                  "cap_hdr.id offset");
VFU_STATIC_ASSERT(offsetof(struct cap_hdr, next) == PCI_CAP_LIST_NEXT,
                  "cap_hdr.next offset");

/* Vendor-specific capability (PCI_CAP_ID_VNDR); size counts the header. */
struct vsc {
    struct cap_hdr hdr;
    uint8_t size;
    uint8_t data[];
} __attribute__((packed));

/* The 32-bit header of a PCI Express extended capability. */
struct pcie_ext_cap_hdr {
    uint32_t id:16;       /* PCI_EXT_CAP_ID_* */
    uint32_t version:4;
    uint32_t next:12;     /* offset of the next extended capability, or 0 */
} __attribute__((packed));

/* Vendor-specific extended capability (PCI_EXT_CAP_ID_VNDR). */
struct pcie_ext_cap_vsc_hdr {
    struct pcie_ext_cap_hdr hdr;
    uint32_t id:16;       /* vendor-defined ID */
    uint32_t rev:4;
    uint32_t len:12;      /* bytes, both headers included */
    uint8_t data[];
} __attribute__((packed));

#ifdef __cplusplus
}
#endif

#endif /* LIB_VFIO_USER_PCI_CAPS_COMMON_H */
