/* SPDX-License-Identifier: BSD-3-Clause */
/* ABI checks for <vfio-user/libvfio-user.h> and the built library (C and C++). */

#include <sys/uio.h>
#include <sys/types.h>

#include <vfio-user/libvfio-user.h>

#include "abi_check.h"

static void
test_constants(void)
{
    IS_MACRO(LIB_VFIO_USER_H);

    MACRO_S(LIB_VFIO_USER_MAJOR, 0, "0");
    MACRO_S(LIB_VFIO_USER_MINOR, 2, "2");
    MACRO_S(LIBVFIO_USER_FLAG_ATTACH_NB, 1u << 0, "(1 << 0)");

    SIZE(vfu_trans_t, 4);
    ENUM_C(VFU_TRANS_SOCK, 0, vfu_trans_t);
    ENUM_C(VFU_TRANS_PIPE, 1, vfu_trans_t);
    ENUM_C(VFU_TRANS_MAX, 2, vfu_trans_t);

    SIZE(vfu_dev_type_t, 4);
    ENUM_C(VFU_DEV_TYPE_PCI, 0, vfu_dev_type_t);

    MACRO_S(VFU_REGION_FLAG_READ, 1u << 0, "(1 << 0)");
    MACRO_S(VFU_REGION_FLAG_WRITE, 1u << 1, "(1 << 1)");
    MACRO_V(VFU_REGION_FLAG_RW, 3);
    MACRO_S(VFU_REGION_FLAG_MEM, 1u << 2, "(1 << 2)");
    MACRO_S(VFU_REGION_FLAG_ALWAYS_CB, 1u << 3, "(1 << 3)");
    MACRO_S(VFU_REGION_FLAG_64_BITS, 1u << 4, "(1 << 4)");
    MACRO_S(VFU_REGION_FLAG_PREFETCH, 1u << 5, "(1 << 5)");
    MACRO_V(VFU_REGION_FLAG_MASK, 0x3f);

    SIZE(vfu_reset_type_t, 4);
    TYPEDEF_OF(vfu_reset_type_t, enum vfu_reset_type);
    ENUM_C(VFU_RESET_DEVICE, 0, enum vfu_reset_type);
    ENUM_C(VFU_RESET_LOST_CONN, 1, enum vfu_reset_type);
    ENUM_C(VFU_RESET_PCI_FLR, 2, enum vfu_reset_type);

    MACRO_S(LIBVFIO_USER_MAX_DMA_REGIONS, 1000000, "(1000 * 1000)");

    SIZE(enum vfu_dev_irq_type, 4);
    ENUM_C(VFU_DEV_INTX_IRQ, 0, enum vfu_dev_irq_type);
    ENUM_C(VFU_DEV_MSI_IRQ, 1, enum vfu_dev_irq_type);
    ENUM_C(VFU_DEV_MSIX_IRQ, 2, enum vfu_dev_irq_type);
    ENUM_C(VFU_DEV_ERR_IRQ, 3, enum vfu_dev_irq_type);
    ENUM_C(VFU_DEV_REQ_IRQ, 4, enum vfu_dev_irq_type);
    ENUM_C(VFU_DEV_NUM_IRQS, 5, enum vfu_dev_irq_type);

    SIZE(vfu_migr_state_t, 4);
    ENUM_C(VFU_MIGR_STATE_STOP, 0, vfu_migr_state_t);
    ENUM_C(VFU_MIGR_STATE_RUNNING, 1, vfu_migr_state_t);
    ENUM_C(VFU_MIGR_STATE_STOP_AND_COPY, 2, vfu_migr_state_t);
    ENUM_C(VFU_MIGR_STATE_PRE_COPY, 3, vfu_migr_state_t);
    ENUM_C(VFU_MIGR_STATE_RESUME, 4, vfu_migr_state_t);

    MACRO_S(VFU_MIGR_CALLBACKS_VERS, 2, "2");
    MACRO_S(VFU_SGL_DIRECT_ACCESS, 1, "(1)");

    /* Anonymous enums: value and "not a macro" only. */
    check_num("VFU_PCI_DEV_BAR0_REGION_IDX", VFU_PCI_DEV_BAR0_REGION_IDX, 0);
    check_num("VFU_PCI_DEV_BAR1_REGION_IDX", VFU_PCI_DEV_BAR1_REGION_IDX, 1);
    check_num("VFU_PCI_DEV_BAR2_REGION_IDX", VFU_PCI_DEV_BAR2_REGION_IDX, 2);
    check_num("VFU_PCI_DEV_BAR3_REGION_IDX", VFU_PCI_DEV_BAR3_REGION_IDX, 3);
    check_num("VFU_PCI_DEV_BAR4_REGION_IDX", VFU_PCI_DEV_BAR4_REGION_IDX, 4);
    check_num("VFU_PCI_DEV_BAR5_REGION_IDX", VFU_PCI_DEV_BAR5_REGION_IDX, 5);
    check_num("VFU_PCI_DEV_ROM_REGION_IDX", VFU_PCI_DEV_ROM_REGION_IDX, 6);
    check_num("VFU_PCI_DEV_CFG_REGION_IDX", VFU_PCI_DEV_CFG_REGION_IDX, 7);
    check_num("VFU_PCI_DEV_VGA_REGION_IDX", VFU_PCI_DEV_VGA_REGION_IDX, 8);
    check_num("VFU_PCI_DEV_NUM_REGIONS", VFU_PCI_DEV_NUM_REGIONS, 9);
    check_true("VFU_PCI_DEV_*_REGION_IDX are enumerators",
               strcmp("VFU_PCI_DEV_BAR0_REGION_IDX",
                      XSTR(VFU_PCI_DEV_BAR0_REGION_IDX)) == 0 &&
               strcmp("VFU_PCI_DEV_NUM_REGIONS",
                      XSTR(VFU_PCI_DEV_NUM_REGIONS)) == 0);

    SIZE(vfu_pci_type_t, 4);
    ENUM_C(VFU_PCI_TYPE_CONVENTIONAL, 0, vfu_pci_type_t);
    ENUM_C(VFU_PCI_TYPE_PCI_X_1, 1, vfu_pci_type_t);
    ENUM_C(VFU_PCI_TYPE_PCI_X_2, 2, vfu_pci_type_t);
    ENUM_C(VFU_PCI_TYPE_EXPRESS, 3, vfu_pci_type_t);

    check_num("VFU_GENERIC_DEV_MIGR_REGION_IDX",
              VFU_GENERIC_DEV_MIGR_REGION_IDX, 0);
    check_num("VFU_GENERIC_DEV_NUM_REGIONS", VFU_GENERIC_DEV_NUM_REGIONS, 1);
    check_true("VFU_GENERIC_DEV_* are enumerators",
               strcmp("VFU_GENERIC_DEV_NUM_REGIONS",
                      XSTR(VFU_GENERIC_DEV_NUM_REGIONS)) == 0);

    MACRO_S(VFU_CAP_FLAG_EXTENDED, 1u << 0, "(1 << 0)");
    MACRO_S(VFU_CAP_FLAG_CALLBACK, 1u << 1, "(1 << 1)");
    MACRO_S(VFU_CAP_FLAG_READONLY, 1u << 2, "(1 << 2)");
}

static void
test_types(void)
{
    TYPEDEF_OF(vfu_dma_addr_t, void *);
    TYPEDEF_OF(dma_sg_t, struct dma_sg);
    TYPEDEF_OF(vfu_ctx_t, struct vfu_ctx);

    TYPEDEF_OF(vfu_dma_info_t, struct vfu_dma_info);
    SIZE_ALIGN(vfu_dma_info_t, 56, 8);
    MEMBER(vfu_dma_info_t, iova, 0, struct iovec);
    MEMBER(vfu_dma_info_t, vaddr, 16, void *);
    MEMBER(vfu_dma_info_t, mapping, 24, struct iovec);
    MEMBER(vfu_dma_info_t, page_size, 40, size_t);
    MEMBER(vfu_dma_info_t, prot, 48, uint32_t);

    SIZE_ALIGN(vfu_migration_callbacks_t, 32, 8);
    MEMBER(vfu_migration_callbacks_t, version, 0, int);
    MEMBER(vfu_migration_callbacks_t, transition, 8,
           int (*)(vfu_ctx_t *, vfu_migr_state_t));
    MEMBER(vfu_migration_callbacks_t, read_data, 16,
           ssize_t (*)(vfu_ctx_t *, void *, uint64_t));
    MEMBER(vfu_migration_callbacks_t, write_data, 24,
           ssize_t (*)(vfu_ctx_t *, void *, uint64_t));

    check_true("dma_sg_size is size_t (void)",
               SAME_TYPE(TYPEOF(dma_sg_size), size_t (void)));
}

static void
test_runtime(void)
{
    check_num("dma_sg_size()", dma_sg_size(), 40);
}

int
main(void)
{
    test_constants();
    test_types();
    test_runtime();

    return abi_summary();
}
