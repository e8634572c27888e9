/* SPDX-License-Identifier: BSD-3-Clause */
/* ABI checks for the protocol, PCI header and PCI capability headers (C and C++). */

#include <vfio-user/vfio-user.h>
#include <vfio-user/pci_defs.h>
#include <vfio-user/pci_caps/common.h>
#include <vfio-user/pci_caps/dsn.h>
#include <vfio-user/pci_caps/msi.h>
#include <vfio-user/pci_caps/msix.h>
#include <vfio-user/pci_caps/pm.h>
#include <vfio-user/pci_caps/px.h>

#include "abi_check.h"

/* The nested union keeps C++ class scope, exactly as with upstream. */
#ifdef __cplusplus
typedef vfio_user_region_io_fds_reply::sub_region sub_region_u;
#else
typedef union sub_region sub_region_u;
#endif

/* ---- vfio-user.h ---- */

static void
test_vfio_user_h(void)
{
    IS_MACRO(VFIO_USER_H);

    MACRO_S(VFIO_USER_DEFAULT_MAX_DATA_XFER_SIZE, 1048576, "(1024 * 1024)");

    SIZE(enum vfio_user_command, 4);
    ENUM_C(VFIO_USER_VERSION, 1, enum vfio_user_command);
    ENUM_C(VFIO_USER_DMA_MAP, 2, enum vfio_user_command);
    ENUM_C(VFIO_USER_DMA_UNMAP, 3, enum vfio_user_command);
    ENUM_C(VFIO_USER_DEVICE_GET_INFO, 4, enum vfio_user_command);
    ENUM_C(VFIO_USER_DEVICE_GET_REGION_INFO, 5, enum vfio_user_command);
    ENUM_C(VFIO_USER_DEVICE_GET_REGION_IO_FDS, 6, enum vfio_user_command);
    ENUM_C(VFIO_USER_DEVICE_GET_IRQ_INFO, 7, enum vfio_user_command);
    ENUM_C(VFIO_USER_DEVICE_SET_IRQS, 8, enum vfio_user_command);
    ENUM_C(VFIO_USER_REGION_READ, 9, enum vfio_user_command);
    ENUM_C(VFIO_USER_REGION_WRITE, 10, enum vfio_user_command);
    ENUM_C(VFIO_USER_DMA_READ, 11, enum vfio_user_command);
    ENUM_C(VFIO_USER_DMA_WRITE, 12, enum vfio_user_command);
    ENUM_C(VFIO_USER_DEVICE_RESET, 13, enum vfio_user_command);
    ENUM_C(VFIO_USER_REGION_WRITE_MULTI, 15, enum vfio_user_command);
    ENUM_C(VFIO_USER_DEVICE_FEATURE, 16, enum vfio_user_command);
    ENUM_C(VFIO_USER_MIG_DATA_READ, 17, enum vfio_user_command);
    ENUM_C(VFIO_USER_MIG_DATA_WRITE, 18, enum vfio_user_command);
    ENUM_C(VFIO_USER_MAX, 19, enum vfio_user_command);

    SIZE(enum vfio_user_message_type, 4);
    ENUM_C(VFIO_USER_MESSAGE_COMMAND, 0, enum vfio_user_message_type);
    ENUM_C(VFIO_USER_MESSAGE_REPLY, 1, enum vfio_user_message_type);

    MACRO_S(VFIO_USER_FLAGS_NO_REPLY, 0x1, "(0x1)");
    MACRO_S(VFIO_USER_F_TYPE_MASK, 0xf, "(0xf)");
    MACRO_S(VFIO_USER_F_TYPE_COMMAND, 0x0, "(0x0)");
    MACRO_S(VFIO_USER_F_TYPE_REPLY, 0x1, "(0x1)");
    MACRO_S(VFIO_USER_F_NO_REPLY, 0x10, "(0x10)");
    MACRO_S(VFIO_USER_F_ERROR, 0x20, "(0x20)");

    SIZE_ALIGN(struct vfio_user_header, 16, 1);
    MEMBER(struct vfio_user_header, msg_id, 0, uint16_t);
    MEMBER(struct vfio_user_header, cmd, 2, uint16_t);
    MEMBER(struct vfio_user_header, msg_size, 4, uint32_t);
    MEMBER(struct vfio_user_header, flags, 8, uint32_t);
    MEMBER(struct vfio_user_header, error_no, 12, uint32_t);

    SIZE_ALIGN(struct vfio_user_version, 4, 1);
    MEMBER(struct vfio_user_version, major, 0, uint16_t);
    MEMBER(struct vfio_user_version, minor, 2, uint16_t);
    FLEX(struct vfio_user_version, data, 4, uint8_t);

    SIZE_ALIGN(struct vfio_user_device_info, 16, 1);
    MEMBER(struct vfio_user_device_info, argsz, 0, uint32_t);
    MEMBER(struct vfio_user_device_info, flags, 4, uint32_t);
    MEMBER(struct vfio_user_device_info, num_regions, 8, uint32_t);
    MEMBER(struct vfio_user_device_info, num_irqs, 12, uint32_t);

    SIZE_ALIGN(struct vfio_user_bitmap, 16, 1);
    MEMBER(struct vfio_user_bitmap, pgsize, 0, uint64_t);
    MEMBER(struct vfio_user_bitmap, size, 8, uint64_t);
    FLEX(struct vfio_user_bitmap, data, 16, char);

    MACRO_S(VFIO_USER_F_DMA_REGION_READ, 1, "(1 << 0)");
    MACRO_S(VFIO_USER_F_DMA_REGION_WRITE, 2, "(1 << 1)");
    MACRO_S(VFIO_USER_F_DMA_REGION_MMAP, 4, "(1 << 2)");
    MACRO_S(VFIO_USER_F_DMA_REGION_FILE_IO, 8, "(1 << 3)");

    SIZE_ALIGN(struct vfio_user_dma_map, 32, 1);
    MEMBER(struct vfio_user_dma_map, argsz, 0, uint32_t);
    MEMBER(struct vfio_user_dma_map, flags, 4, uint32_t);
    MEMBER(struct vfio_user_dma_map, offset, 8, uint64_t);
    MEMBER(struct vfio_user_dma_map, addr, 16, uint64_t);
    MEMBER(struct vfio_user_dma_map, size, 24, uint64_t);

    /* May come from <linux/vfio.h>: value only. */
    MACRO_V(VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP, 1);
    MACRO_V(VFIO_DMA_UNMAP_FLAG_ALL, 2);

    /* The one protocol struct that is not packed. */
    SIZE_ALIGN(struct vfio_user_dma_unmap, 24, 8);
    MEMBER(struct vfio_user_dma_unmap, argsz, 0, uint32_t);
    MEMBER(struct vfio_user_dma_unmap, flags, 4, uint32_t);
    MEMBER(struct vfio_user_dma_unmap, addr, 8, uint64_t);
    MEMBER(struct vfio_user_dma_unmap, size, 16, uint64_t);
    FLEX(struct vfio_user_dma_unmap, bitmap, 24, struct vfio_user_bitmap);

    SIZE_ALIGN(struct vfio_user_region_access, 16, 1);
    MEMBER(struct vfio_user_region_access, offset, 0, uint64_t);
    MEMBER(struct vfio_user_region_access, region, 8, uint32_t);
    MEMBER(struct vfio_user_region_access, count, 12, uint32_t);
    FLEX(struct vfio_user_region_access, data, 16, uint8_t);

    SIZE_ALIGN(struct vfio_user_dma_region_access, 16, 1);
    MEMBER(struct vfio_user_dma_region_access, addr, 0, uint64_t);
    MEMBER(struct vfio_user_dma_region_access, count, 8, uint64_t);
    FLEX(struct vfio_user_dma_region_access, data, 16, uint8_t);

    SIZE_ALIGN(struct vfio_user_irq_info, 4, 1);
    MEMBER(struct vfio_user_irq_info, subindex, 0, uint32_t);

    TYPEDEF_OF(vfio_user_region_io_fds_request_t,
               struct vfio_user_region_io_fds_request);
    SIZE_ALIGN(struct vfio_user_region_io_fds_request, 16, 1);
    MEMBER(struct vfio_user_region_io_fds_request, argsz, 0, uint32_t);
    MEMBER(struct vfio_user_region_io_fds_request, flags, 4, uint32_t);
    MEMBER(struct vfio_user_region_io_fds_request, index, 8, uint32_t);
    MEMBER(struct vfio_user_region_io_fds_request, count, 12, uint32_t);

    MACRO_S(VFIO_USER_IO_FD_TYPE_IOEVENTFD, 0, "0");
    MACRO_S(VFIO_USER_IO_FD_TYPE_IOREGIONFD, 1, "1");
    MACRO_S(VFIO_USER_IO_FD_TYPE_IOEVENTFD_SHADOW, 2, "2");

    TYPEDEF_OF(vfio_user_sub_region_ioeventfd_t,
               struct vfio_user_sub_region_ioeventfd);
    SIZE_ALIGN(struct vfio_user_sub_region_ioeventfd, 48, 1);
    MEMBER(struct vfio_user_sub_region_ioeventfd, gpa_offset, 0, uint64_t);
    MEMBER(struct vfio_user_sub_region_ioeventfd, size, 8, uint64_t);
    MEMBER(struct vfio_user_sub_region_ioeventfd, fd_index, 16, uint32_t);
    MEMBER(struct vfio_user_sub_region_ioeventfd, type, 20, uint32_t);
    MEMBER(struct vfio_user_sub_region_ioeventfd, flags, 24, uint32_t);
    MEMBER(struct vfio_user_sub_region_ioeventfd, shadow_mem_fd_index, 28,
           uint32_t);
    MEMBER(struct vfio_user_sub_region_ioeventfd, shadow_offset, 32, uint64_t);
    MEMBER(struct vfio_user_sub_region_ioeventfd, datamatch, 40, uint64_t);

    TYPEDEF_OF(vfio_user_sub_region_ioregionfd_t,
               struct vfio_user_sub_region_ioregionfd);
    SIZE_ALIGN(struct vfio_user_sub_region_ioregionfd, 40, 1);
    MEMBER(struct vfio_user_sub_region_ioregionfd, offset, 0, uint64_t);
    MEMBER(struct vfio_user_sub_region_ioregionfd, size, 8, uint64_t);
    MEMBER(struct vfio_user_sub_region_ioregionfd, fd_index, 16, uint32_t);
    MEMBER(struct vfio_user_sub_region_ioregionfd, type, 20, uint32_t);
    MEMBER(struct vfio_user_sub_region_ioregionfd, flags, 24, uint32_t);
    MEMBER(struct vfio_user_sub_region_ioregionfd, padding, 28, uint32_t);
    MEMBER(struct vfio_user_sub_region_ioregionfd, user_data, 32, uint64_t);

    TYPEDEF_OF(vfio_user_region_io_fds_reply_t,
               struct vfio_user_region_io_fds_reply);
    SIZE_ALIGN(struct vfio_user_region_io_fds_reply, 16, 1);
    MEMBER(struct vfio_user_region_io_fds_reply, argsz, 0, uint32_t);
    MEMBER(struct vfio_user_region_io_fds_reply, flags, 4, uint32_t);
    MEMBER(struct vfio_user_region_io_fds_reply, index, 8, uint32_t);
    MEMBER(struct vfio_user_region_io_fds_reply, count, 12, uint32_t);
    FLEX(struct vfio_user_region_io_fds_reply, sub_regions, 16, sub_region_u);

    SIZE_ALIGN(sub_region_u, 48, 1);
    MEMBER(sub_region_u, ioeventfd, 0, struct vfio_user_sub_region_ioeventfd);
    MEMBER(sub_region_u, ioregionfd, 0, struct vfio_user_sub_region_ioregionfd);

    SIZE_ALIGN(struct vfio_user_device_feature_dma_logging_range, 16, 1);
    MEMBER(struct vfio_user_device_feature_dma_logging_range, iova, 0, uint64_t);
    MEMBER(struct vfio_user_device_feature_dma_logging_range, length, 8,
           uint64_t);

    SIZE_ALIGN(struct vfio_user_device_feature_dma_logging_control, 16, 1);
    MEMBER(struct vfio_user_device_feature_dma_logging_control, page_size, 0,
           uint64_t);
    MEMBER(struct vfio_user_device_feature_dma_logging_control, num_ranges, 8,
           uint32_t);
    MEMBER(struct vfio_user_device_feature_dma_logging_control, reserved, 12,
           uint32_t);
    FLEX(struct vfio_user_device_feature_dma_logging_control, ranges, 16,
         struct vfio_user_device_feature_dma_logging_range);

    SIZE_ALIGN(struct vfio_user_device_feature_dma_logging_report, 24, 1);
    MEMBER(struct vfio_user_device_feature_dma_logging_report, iova, 0,
           uint64_t);
    MEMBER(struct vfio_user_device_feature_dma_logging_report, length, 8,
           uint64_t);
    MEMBER(struct vfio_user_device_feature_dma_logging_report, page_size, 16,
           uint64_t);
    FLEX(struct vfio_user_device_feature_dma_logging_report, bitmap, 24,
         uint8_t);

    /* These may all come from <linux/vfio.h>: values only. */
    MACRO_V(VFIO_DEVICE_FEATURE_DMA_LOGGING_START, 6);
    MACRO_V(VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP, 7);
    MACRO_V(VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT, 8);
    MACRO_V(VFIO_DEVICE_FEATURE_MASK, 0xffff);
    MACRO_V(VFIO_DEVICE_FEATURE_GET, 1u << 16);
    MACRO_V(VFIO_DEVICE_FEATURE_SET, 1u << 17);
    MACRO_V(VFIO_DEVICE_FEATURE_PROBE, 1u << 18);
    MACRO_V(VFIO_MIGRATION_STOP_COPY, 1);
    MACRO_V(VFIO_MIGRATION_P2P, 2);
    MACRO_V(VFIO_MIGRATION_PRE_COPY, 4);
    MACRO_V(VFIO_DEVICE_FEATURE_MIGRATION, 1);
    MACRO_V(VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, 2);

    SIZE_ALIGN(struct vfio_user_device_feature, 8, 1);
    MEMBER(struct vfio_user_device_feature, argsz, 0, uint32_t);
    MEMBER(struct vfio_user_device_feature, flags, 4, uint32_t);
    FLEX(struct vfio_user_device_feature, data, 8, uint8_t);

    SIZE_ALIGN(struct vfio_user_device_feature_migration, 8, 1);
    MEMBER(struct vfio_user_device_feature_migration, flags, 0, uint64_t);

    SIZE_ALIGN(struct vfio_user_device_feature_mig_state, 8, 1);
    MEMBER(struct vfio_user_device_feature_mig_state, device_state, 0,
           uint32_t);
    MEMBER(struct vfio_user_device_feature_mig_state, data_fd, 4, uint32_t);

    SIZE(enum vfio_user_device_mig_state, 4);
    ENUM_C(VFIO_USER_DEVICE_STATE_ERROR, 0, enum vfio_user_device_mig_state);
    ENUM_C(VFIO_USER_DEVICE_STATE_STOP, 1, enum vfio_user_device_mig_state);
    ENUM_C(VFIO_USER_DEVICE_STATE_RUNNING, 2, enum vfio_user_device_mig_state);
    ENUM_C(VFIO_USER_DEVICE_STATE_STOP_COPY, 3,
           enum vfio_user_device_mig_state);
    ENUM_C(VFIO_USER_DEVICE_STATE_RESUMING, 4, enum vfio_user_device_mig_state);
    ENUM_C(VFIO_USER_DEVICE_STATE_RUNNING_P2P, 5,
           enum vfio_user_device_mig_state);
    ENUM_C(VFIO_USER_DEVICE_STATE_PRE_COPY, 6, enum vfio_user_device_mig_state);
    ENUM_C(VFIO_USER_DEVICE_STATE_PRE_COPY_P2P, 7,
           enum vfio_user_device_mig_state);
    ENUM_C(VFIO_USER_DEVICE_NUM_STATES, 8, enum vfio_user_device_mig_state);

    SIZE_ALIGN(struct vfio_user_mig_data, 8, 1);
    MEMBER(struct vfio_user_mig_data, argsz, 0, uint32_t);
    MEMBER(struct vfio_user_mig_data, size, 4, uint32_t);
    FLEX(struct vfio_user_mig_data, data, 8, uint8_t);
}

/* ---- pci_defs.h ---- */

static void
test_pci_defs_h(void)
{
    IS_MACRO(LIBVFIO_USER_PCI_DEFS_H);

    MACRO_V(PCI_BASE_ADDRESS_MEM_TYPE_LOCATABLE_32, 0);
    MACRO_V(PCI_BASE_ADDRESS_MEM_TYPE_LOCATABLE_1M, 1);
    MACRO_V(PCI_BASE_ADDRESS_MEM_TYPE_LOCATABLE_64, 2);
    MACRO_S(PCI_BARS_NR, 6, "6");

    SIZE_ALIGN(vfu_pci_hdr_ss_t, 4, 1);
    MEMBER(vfu_pci_hdr_ss_t, raw, 0, uint32_t);
    MEMBER(vfu_pci_hdr_ss_t, vid, 0, uint16_t);
    MEMBER(vfu_pci_hdr_ss_t, sid, 2, uint16_t);

    SIZE_ALIGN(vfu_pci_hdr_bist_t, 1, 1);
    MEMBER(vfu_pci_hdr_bist_t, raw, 0, uint8_t);

    SIZE_ALIGN(vfu_bar_t, 4, 1);
    MEMBER(vfu_bar_t, raw, 0, uint32_t);
    MEMBER_AT(vfu_bar_t, mem, 0, 4);
    MEMBER_AT(vfu_bar_t, io, 0, 4);
    BITS(vfu_bar_t, mem.region_type, 0, 1, unsigned int);
    BITS(vfu_bar_t, mem.locatable, 1, 2, unsigned int);
    BITS(vfu_bar_t, mem.prefetchable, 3, 1, unsigned int);
    BITS(vfu_bar_t, mem.base_address, 4, 28, unsigned int);
    BITS(vfu_bar_t, io.region_type, 0, 1, unsigned int);
    BITS(vfu_bar_t, io.reserved, 1, 1, unsigned int);
    BITS(vfu_bar_t, io.base_address, 2, 30, unsigned int);

    SIZE_ALIGN(vfu_pci_hdr_htype_t, 1, 1);
    MEMBER(vfu_pci_hdr_htype_t, raw, 0, uint8_t);

    SIZE_ALIGN(vfu_pci_hdr_cc_t, 3, 1);
    MEMBER(vfu_pci_hdr_cc_t, raw, 0, uint8_t[3]);
    MEMBER(vfu_pci_hdr_cc_t, pi, 0, uint8_t);
    MEMBER(vfu_pci_hdr_cc_t, scc, 1, uint8_t);
    MEMBER(vfu_pci_hdr_cc_t, bcc, 2, uint8_t);

    SIZE_ALIGN(vfu_pci_hdr_sts_t, 2, 1);
    MEMBER(vfu_pci_hdr_sts_t, raw, 0, uint16_t);
    BITS(vfu_pci_hdr_sts_t, res1, 0, 3, unsigned int);
    BITS(vfu_pci_hdr_sts_t, is, 3, 1, unsigned int);
    BITS(vfu_pci_hdr_sts_t, cl, 4, 1, unsigned int);
    BITS(vfu_pci_hdr_sts_t, c66, 5, 1, unsigned int);
    BITS(vfu_pci_hdr_sts_t, res2, 6, 1, unsigned int);
    BITS(vfu_pci_hdr_sts_t, fbc, 7, 1, unsigned int);
    BITS(vfu_pci_hdr_sts_t, dpd, 8, 1, unsigned int);
    BITS(vfu_pci_hdr_sts_t, devt, 9, 2, unsigned int);
    BITS(vfu_pci_hdr_sts_t, sta, 11, 1, unsigned int);
    BITS(vfu_pci_hdr_sts_t, rta, 12, 1, unsigned int);
    BITS(vfu_pci_hdr_sts_t, rma, 13, 1, unsigned int);
    BITS(vfu_pci_hdr_sts_t, sse, 14, 1, unsigned int);
    BITS(vfu_pci_hdr_sts_t, dpe, 15, 1, unsigned int);

    SIZE_ALIGN(vfu_pci_hdr_cmd_t, 2, 1);
    MEMBER(vfu_pci_hdr_cmd_t, raw, 0, uint16_t);
    BITS(vfu_pci_hdr_cmd_t, iose, 0, 1, uint8_t);
    BITS(vfu_pci_hdr_cmd_t, mse, 1, 1, uint8_t);
    BITS(vfu_pci_hdr_cmd_t, bme, 2, 1, uint8_t);
    BITS(vfu_pci_hdr_cmd_t, sce, 3, 1, uint8_t);
    BITS(vfu_pci_hdr_cmd_t, mwie, 4, 1, uint8_t);
    BITS(vfu_pci_hdr_cmd_t, vga, 5, 1, uint8_t);
    BITS(vfu_pci_hdr_cmd_t, pee, 6, 1, uint8_t);
    BITS(vfu_pci_hdr_cmd_t, zero, 7, 1, uint8_t);
    BITS(vfu_pci_hdr_cmd_t, see, 8, 1, uint8_t);
    BITS(vfu_pci_hdr_cmd_t, fbe, 9, 1, uint8_t);
    BITS(vfu_pci_hdr_cmd_t, id, 10, 1, uint8_t);
    BITS(vfu_pci_hdr_cmd_t, res1, 11, 5, uint8_t);

    SIZE_ALIGN(vfu_pci_hdr_id_t, 4, 1);
    MEMBER(vfu_pci_hdr_id_t, raw, 0, uint32_t);
    MEMBER(vfu_pci_hdr_id_t, vid, 0, uint16_t);
    MEMBER(vfu_pci_hdr_id_t, did, 2, uint16_t);

    SIZE_ALIGN(vfu_pci_hdr_intr_t, 2, 1);
    MEMBER(vfu_pci_hdr_intr_t, raw, 0, uint16_t);
    MEMBER(vfu_pci_hdr_intr_t, iline, 0, uint8_t);
    MEMBER(vfu_pci_hdr_intr_t, ipin, 1, uint8_t);

    SIZE_ALIGN(vfu_pci_hdr_t, 64, 1);
    MEMBER(vfu_pci_hdr_t, raw, 0, uint8_t[64]);
    MEMBER(vfu_pci_hdr_t, id, 0, vfu_pci_hdr_id_t);
    MEMBER(vfu_pci_hdr_t, cmd, 4, vfu_pci_hdr_cmd_t);
    MEMBER(vfu_pci_hdr_t, sts, 6, vfu_pci_hdr_sts_t);
    MEMBER(vfu_pci_hdr_t, rid, 8, uint8_t);
    MEMBER(vfu_pci_hdr_t, cc, 9, vfu_pci_hdr_cc_t);
    MEMBER(vfu_pci_hdr_t, cls, 12, uint8_t);
    MEMBER(vfu_pci_hdr_t, mlt, 13, uint8_t);
    MEMBER(vfu_pci_hdr_t, htype, 14, vfu_pci_hdr_htype_t);
    MEMBER(vfu_pci_hdr_t, bist, 15, vfu_pci_hdr_bist_t);
    MEMBER(vfu_pci_hdr_t, bars, 16, vfu_bar_t[6]);
    MEMBER(vfu_pci_hdr_t, ccptr, 40, uint32_t);
    MEMBER(vfu_pci_hdr_t, ss, 44, vfu_pci_hdr_ss_t);
    MEMBER(vfu_pci_hdr_t, erom, 48, uint32_t);
    MEMBER(vfu_pci_hdr_t, cap, 52, uint8_t);
    MEMBER(vfu_pci_hdr_t, res1, 53, uint8_t[7]);
    MEMBER(vfu_pci_hdr_t, intr, 60, vfu_pci_hdr_intr_t);
    MEMBER(vfu_pci_hdr_t, mgnt, 62, uint8_t);
    MEMBER(vfu_pci_hdr_t, mlat, 63, uint8_t);
    /* Registers at their config space offsets, seen through the header. */
    MEMBER(vfu_pci_hdr_t, bars[5], 36, vfu_bar_t);
    MEMBER(vfu_pci_hdr_t, ss.sid, 46, uint16_t);
    MEMBER(vfu_pci_hdr_t, intr.ipin, 61, uint8_t);
    BITS(vfu_pci_hdr_t, cmd.id, 32 + 10, 1, uint8_t);
    BITS(vfu_pci_hdr_t, sts.cl, 48 + 4, 1, unsigned int);
    BITS(vfu_pci_hdr_t, bars[2].mem.base_address, (16 + 2 * 4) * 8 + 4, 28,
         unsigned int);

    SIZE_ALIGN(vfu_pci_config_space_t, 256, 1);
    MEMBER(vfu_pci_config_space_t, raw, 0, uint8_t[256]);
    MEMBER(vfu_pci_config_space_t, hdr, 0, vfu_pci_hdr_t);
    FLEX(vfu_pci_config_space_t, extended, 256, uint8_t);
    MEMBER(vfu_pci_config_space_t, hdr.cap, 52, uint8_t);
}

/* ---- pci_caps/common.h ---- */

static void
test_caps_common_h(void)
{
    IS_MACRO(LIB_VFIO_USER_PCI_CAPS_COMMON_H);

    SIZE_ALIGN(struct cap_hdr, 2, 1);
    MEMBER(struct cap_hdr, id, 0, uint8_t);
    MEMBER(struct cap_hdr, next, 1, uint8_t);

    SIZE_ALIGN(struct vsc, 3, 1);
    MEMBER(struct vsc, hdr, 0, struct cap_hdr);
    MEMBER(struct vsc, size, 2, uint8_t);
    FLEX(struct vsc, data, 3, uint8_t);

    SIZE_ALIGN(struct pcie_ext_cap_hdr, 4, 1);
    BITS(struct pcie_ext_cap_hdr, id, 0, 16, uint32_t);
    BITS(struct pcie_ext_cap_hdr, version, 16, 4, uint32_t);
    BITS(struct pcie_ext_cap_hdr, next, 20, 12, uint32_t);

    SIZE_ALIGN(struct pcie_ext_cap_vsc_hdr, 8, 1);
    MEMBER(struct pcie_ext_cap_vsc_hdr, hdr, 0, struct pcie_ext_cap_hdr);
    BITS(struct pcie_ext_cap_vsc_hdr, id, 32, 16, uint32_t);
    BITS(struct pcie_ext_cap_vsc_hdr, rev, 48, 4, uint32_t);
    BITS(struct pcie_ext_cap_vsc_hdr, len, 52, 12, uint32_t);
    BITS(struct pcie_ext_cap_vsc_hdr, hdr.next, 20, 12, uint32_t);
    FLEX(struct pcie_ext_cap_vsc_hdr, data, 8, uint8_t);
}

/* ---- pci_caps/dsn.h ---- */

static void
test_caps_dsn_h(void)
{
    IS_MACRO(LIB_VFIO_USER_PCI_CAPS_DSN_H);

    SIZE_ALIGN(struct dsncap, 12, 1);
    MEMBER(struct dsncap, hdr, 0, struct pcie_ext_cap_hdr);
    MEMBER(struct dsncap, sn_lo, 4, uint32_t);
    MEMBER(struct dsncap, sn_hi, 8, uint32_t);
    BITS(struct dsncap, hdr.id, 0, 16, uint32_t);
}

/* ---- pci_caps/msi.h ---- */

static void
test_caps_msi_h(void)
{
    IS_MACRO(LIB_VFIO_USER_PCI_CAPS_MSI_H);

    SIZE_ALIGN(struct mc, 2, 1);
    BITS(struct mc, msie, 0, 1, unsigned int);
    BITS(struct mc, mmc, 1, 3, unsigned int);
    BITS(struct mc, mme, 4, 3, unsigned int);
    BITS(struct mc, c64, 7, 1, unsigned int);
    BITS(struct mc, pvm, 8, 1, unsigned int);
    BITS(struct mc, res1, 9, 7, unsigned int);

    SIZE_ALIGN(struct ma, 4, 1);
    BITS(struct ma, res1, 0, 2, unsigned int);
    BITS(struct ma, addr, 2, 30, unsigned int);

    MACRO_S(VFIO_USER_PCI_CAP_MSI_SIZEOF, 0x18, "(0x18)");

    SIZE_ALIGN(struct msicap, 24, 1);
    MEMBER(struct msicap, hdr, 0, struct cap_hdr);
    MEMBER(struct msicap, mc, 2, struct mc);
    MEMBER(struct msicap, ma, 4, struct ma);
    MEMBER(struct msicap, mua, 8, uint32_t);
    MEMBER(struct msicap, md, 12, uint16_t);
    MEMBER(struct msicap, padding, 14, uint16_t);
    MEMBER(struct msicap, mmask, 16, uint32_t);
    MEMBER(struct msicap, mpend, 20, uint32_t);
    BITS(struct msicap, mc.mme, 16 + 4, 3, unsigned int);
    BITS(struct msicap, ma.addr, 32 + 2, 30, unsigned int);
}

/* ---- pci_caps/msix.h ---- */

static void
test_caps_msix_h(void)
{
    IS_MACRO(LIB_VFIO_USER_PCI_CAPS_MSIX_H);

    SIZE_ALIGN(struct mxc, 2, 1);
    BITS(struct mxc, ts, 0, 11, uint16_t);
    BITS(struct mxc, reserved, 11, 3, uint16_t);
    BITS(struct mxc, fm, 14, 1, uint16_t);
    BITS(struct mxc, mxe, 15, 1, uint16_t);

    SIZE_ALIGN(struct mtab, 4, 1);
    BITS(struct mtab, tbir, 0, 3, uint32_t);
    BITS(struct mtab, to, 3, 29, uint32_t);

    SIZE_ALIGN(struct mpba, 4, 1);
    BITS(struct mpba, pbir, 0, 3, uint32_t);
    BITS(struct mpba, pbao, 3, 29, uint32_t);

    /* Packed but explicitly 4-byte aligned. */
    SIZE_ALIGN(struct msixcap, 12, 4);
    MEMBER(struct msixcap, hdr, 0, struct cap_hdr);
    MEMBER(struct msixcap, mxc, 2, struct mxc);
    MEMBER(struct msixcap, mtab, 4, struct mtab);
    MEMBER(struct msixcap, mpba, 8, struct mpba);
    BITS(struct msixcap, mxc.ts, 16, 11, uint16_t);
    BITS(struct msixcap, mxc.mxe, 31, 1, uint16_t);
    BITS(struct msixcap, mpba.pbao, 64 + 3, 29, uint32_t);
}

/* ---- pci_caps/pm.h ---- */

static void
test_caps_pm_h(void)
{
    IS_MACRO(LIB_VFIO_USER_PCI_CAPS_PM_H);

    SIZE_ALIGN(struct pc, 2, 1);
    BITS(struct pc, vs, 0, 3, uint16_t);
    BITS(struct pc, pmec, 3, 1, uint16_t);
    BITS(struct pc, res, 4, 1, uint16_t);
    BITS(struct pc, dsi, 5, 1, uint16_t);
    BITS(struct pc, auxc, 6, 3, uint16_t);
    BITS(struct pc, d1s, 9, 1, uint16_t);
    BITS(struct pc, d2s, 10, 1, uint16_t);
    BITS(struct pc, psup, 11, 5, uint16_t);

    SIZE_ALIGN(struct pmcs, 2, 1);
    MEMBER(struct pmcs, raw, 0, uint16_t);
    BITS(struct pmcs, ps, 0, 2, uint16_t);
    BITS(struct pmcs, res1, 2, 1, uint16_t);
    BITS(struct pmcs, nsfrst, 3, 1, uint16_t);
    BITS(struct pmcs, res2, 4, 4, uint16_t);
    BITS(struct pmcs, pmee, 8, 1, uint16_t);
    BITS(struct pmcs, dse, 9, 4, uint16_t);
    BITS(struct pmcs, dsc, 13, 2, uint16_t);
    BITS(struct pmcs, pmes, 15, 1, uint16_t);

    SIZE_ALIGN(struct pmcap, 8, 1);
    MEMBER(struct pmcap, hdr, 0, struct cap_hdr);
    MEMBER(struct pmcap, pc, 2, struct pc);
    MEMBER(struct pmcap, pmcs, 4, struct pmcs);
    MEMBER(struct pmcap, pmcsr_bse, 6, uint8_t);
    MEMBER(struct pmcap, data, 7, uint8_t);
    MEMBER(struct pmcap, pmcs.raw, 4, uint16_t);
    BITS(struct pmcap, pmcs.nsfrst, 32 + 3, 1, uint16_t);
    BITS(struct pmcap, pc.psup, 16 + 11, 5, uint16_t);
}

/* ---- pci_caps/px.h ---- */

static void
test_caps_px_h(void)
{
    IS_MACRO(LIB_VFIO_USER_PCI_CAPS_PX_H);

    SIZE_ALIGN(struct pxcaps, 2, 1);
    BITS(struct pxcaps, ver, 0, 4, uint16_t);
    BITS(struct pxcaps, dpt, 4, 4, uint16_t);
    BITS(struct pxcaps, si, 8, 1, uint16_t);
    BITS(struct pxcaps, imn, 9, 5, uint16_t);
    BITS(struct pxcaps, res1, 14, 2, uint16_t);

    SIZE_ALIGN(struct pxdcap, 4, 1);
    BITS(struct pxdcap, mps, 0, 3, uint32_t);
    BITS(struct pxdcap, pfs, 3, 2, uint32_t);
    BITS(struct pxdcap, etfs, 5, 1, uint32_t);
    BITS(struct pxdcap, l0sl, 6, 3, uint32_t);
    BITS(struct pxdcap, l1l, 9, 3, uint32_t);
    BITS(struct pxdcap, res1, 12, 3, uint32_t);
    BITS(struct pxdcap, rer, 15, 1, uint32_t);
    BITS(struct pxdcap, res2, 16, 2, uint32_t);
    BITS(struct pxdcap, csplv, 18, 8, uint32_t);
    BITS(struct pxdcap, cspls, 26, 2, uint32_t);
    BITS(struct pxdcap, flrc, 28, 1, uint32_t);
    BITS(struct pxdcap, res3, 29, 3, uint32_t);

    SIZE_ALIGN(union pxdc, 2, 1);
    MEMBER(union pxdc, raw, 0, uint16_t);
    BITS(union pxdc, cere, 0, 1, uint16_t);
    BITS(union pxdc, nfere, 1, 1, uint16_t);
    BITS(union pxdc, fere, 2, 1, uint16_t);
    BITS(union pxdc, urre, 3, 1, uint16_t);
    BITS(union pxdc, ero, 4, 1, uint16_t);
    BITS(union pxdc, mps, 5, 3, uint16_t);
    BITS(union pxdc, ete, 8, 1, uint16_t);
    BITS(union pxdc, pfe, 9, 1, uint16_t);
    BITS(union pxdc, appme, 10, 1, uint16_t);
    BITS(union pxdc, ens, 11, 1, uint16_t);
    BITS(union pxdc, mrrs, 12, 3, uint16_t);
    BITS(union pxdc, iflr, 15, 1, uint16_t);

    SIZE_ALIGN(struct pxds, 2, 1);
    BITS(struct pxds, stuff, 0, 16, uint16_t);
    SIZE_ALIGN(struct pxlcap, 4, 1);
    BITS(struct pxlcap, stuff, 0, 32, uint32_t);

    SIZE_ALIGN(union pxlc, 2, 1);
    MEMBER(union pxlc, raw, 0, uint16_t);
    BITS(union pxlc, aspmc, 0, 2, uint16_t);
    BITS(union pxlc, rsvdp1, 2, 1, uint16_t);
    BITS(union pxlc, rcb, 3, 1, uint16_t);
    BITS(union pxlc, ld, 4, 1, uint16_t);
    BITS(union pxlc, rl, 5, 1, uint16_t);
    BITS(union pxlc, ccc, 6, 1, uint16_t);
    BITS(union pxlc, es, 7, 1, uint16_t);
    BITS(union pxlc, clkreq_en, 8, 1, uint16_t);
    BITS(union pxlc, hawd, 9, 1, uint16_t);
    BITS(union pxlc, lbmie, 10, 1, uint16_t);
    BITS(union pxlc, labie, 11, 1, uint16_t);
    BITS(union pxlc, rsvdp2, 12, 4, uint16_t);

    SIZE_ALIGN(struct pxls, 2, 1);
    BITS(struct pxls, stuff, 0, 16, uint16_t);
    SIZE_ALIGN(struct pxscap, 4, 1);
    BITS(struct pxscap, stuff, 0, 32, uint32_t);
    SIZE_ALIGN(struct pxsc, 2, 1);
    BITS(struct pxsc, stuff, 0, 16, uint16_t);
    SIZE_ALIGN(struct pxss, 2, 1);
    BITS(struct pxss, stuff, 0, 16, uint16_t);
    SIZE_ALIGN(struct pxrc, 2, 1);
    BITS(struct pxrc, stuff, 0, 16, uint16_t);
    SIZE_ALIGN(struct pxrcap, 2, 1);
    BITS(struct pxrcap, stuff, 0, 16, uint16_t);
    SIZE_ALIGN(struct pxrs, 4, 1);
    BITS(struct pxrs, stuff, 0, 32, uint32_t);

    SIZE_ALIGN(struct pxdcap2, 4, 1);
    BITS(struct pxdcap2, ctrs, 0, 4, uint32_t);
    BITS(struct pxdcap2, ctds, 4, 1, uint32_t);
    BITS(struct pxdcap2, arifs, 5, 1, uint32_t);
    BITS(struct pxdcap2, aors, 6, 1, uint32_t);
    BITS(struct pxdcap2, aocs32, 7, 1, uint32_t);
    BITS(struct pxdcap2, aocs64, 8, 1, uint32_t);
    BITS(struct pxdcap2, ccs128, 9, 1, uint32_t);
    BITS(struct pxdcap2, nprpr, 10, 1, uint32_t);
    BITS(struct pxdcap2, ltrs, 11, 1, uint32_t);
    BITS(struct pxdcap2, tphcs, 12, 2, uint32_t);
    BITS(struct pxdcap2, ln, 14, 2, uint32_t);
    BITS(struct pxdcap2, tcs, 16, 1, uint32_t);
    BITS(struct pxdcap2, trs, 17, 1, uint32_t);
    BITS(struct pxdcap2, obffs, 18, 2, uint32_t);
    BITS(struct pxdcap2, effs, 20, 1, uint32_t);
    BITS(struct pxdcap2, eetps, 21, 1, uint32_t);
    BITS(struct pxdcap2, meetp, 22, 2, uint32_t);
    BITS(struct pxdcap2, eprs, 24, 2, uint32_t);
    BITS(struct pxdcap2, eprir, 26, 1, uint32_t);
    BITS(struct pxdcap2, res1, 27, 1, uint32_t);
    BITS(struct pxdcap2, dmwcs, 28, 1, uint32_t);
    BITS(struct pxdcap2, dmwls, 29, 2, uint32_t);
    BITS(struct pxdcap2, frss, 31, 1, uint32_t);

    SIZE_ALIGN(union pxdc2, 2, 1);
    MEMBER(union pxdc2, raw, 0, uint16_t);
    BITS(union pxdc2, comp_timeout, 0, 4, uint32_t);
    BITS(union pxdc2, comp_timout_dis, 4, 1, uint32_t);
    BITS(union pxdc2, ari, 5, 1, uint32_t);
    BITS(union pxdc2, atomic_req, 6, 1, uint32_t);
    BITS(union pxdc2, atomic_egress_block, 7, 1, uint32_t);
    BITS(union pxdc2, ido_req_en, 8, 1, uint32_t);
    BITS(union pxdc2, ido_cmp_en, 9, 1, uint32_t);
    BITS(union pxdc2, ltr_en, 10, 1, uint32_t);
    BITS(union pxdc2, obff_en, 11, 2, uint32_t);
    BITS(union pxdc2, end_end_tlp_prefix_block, 13, 1, uint32_t);

    SIZE_ALIGN(struct pxds2, 2, 1);
    BITS(struct pxds2, stuff, 0, 16, uint16_t);
    SIZE_ALIGN(struct pxlcap2, 4, 1);
    BITS(struct pxlcap2, stuff, 0, 32, uint32_t);
    SIZE_ALIGN(struct pxlc2, 2, 1);
    BITS(struct pxlc2, stuff, 0, 16, uint16_t);
    SIZE_ALIGN(struct pxls2, 2, 1);
    BITS(struct pxls2, stuff, 0, 16, uint16_t);
    SIZE_ALIGN(struct pxscap2, 4, 1);
    BITS(struct pxscap2, stuff, 0, 32, uint32_t);
    SIZE_ALIGN(struct pxsc2, 2, 1);
    BITS(struct pxsc2, stuff, 0, 16, uint16_t);
    SIZE_ALIGN(struct pxss2, 2, 1);
    BITS(struct pxss2, stuff, 0, 16, uint16_t);

    MACRO_S(VFIO_USER_PCI_CAP_EXP_SIZEOF, 0x3c, "(0x3c)");

    SIZE_ALIGN(struct pxcap, 60, 1);
    MEMBER(struct pxcap, hdr, 0x00, struct cap_hdr);
    MEMBER(struct pxcap, pxcaps, 0x02, struct pxcaps);
    MEMBER(struct pxcap, pxdcap, 0x04, struct pxdcap);
    MEMBER(struct pxcap, pxdc, 0x08, union pxdc);
    MEMBER(struct pxcap, pxds, 0x0a, struct pxds);
    MEMBER(struct pxcap, pxlcap, 0x0c, struct pxlcap);
    MEMBER(struct pxcap, pxlc, 0x10, union pxlc);
    MEMBER(struct pxcap, pxls, 0x12, struct pxls);
    MEMBER(struct pxcap, pxscap, 0x14, struct pxscap);
    MEMBER(struct pxcap, pxsc, 0x18, struct pxsc);
    MEMBER(struct pxcap, pxss, 0x1a, struct pxss);
    MEMBER(struct pxcap, pxrc, 0x1c, struct pxrc);
    MEMBER(struct pxcap, pxrcap, 0x1e, struct pxrcap);
    MEMBER(struct pxcap, pxrs, 0x20, struct pxrs);
    MEMBER(struct pxcap, pxdcap2, 0x24, struct pxdcap2);
    MEMBER(struct pxcap, pxdc2, 0x28, union pxdc2);
    MEMBER(struct pxcap, pxds2, 0x2a, struct pxds2);
    MEMBER(struct pxcap, pxlcap2, 0x2c, struct pxlcap2);
    MEMBER(struct pxcap, pxlc2, 0x30, struct pxlc2);
    MEMBER(struct pxcap, pxls2, 0x32, struct pxls2);
    MEMBER(struct pxcap, pxscap2, 0x34, struct pxscap2);
    MEMBER(struct pxcap, pxsc2, 0x38, struct pxsc2);
    MEMBER(struct pxcap, pxss2, 0x3a, struct pxss2);
    BITS(struct pxcap, pxdcap.flrc, 0x04 * 8 + 28, 1, uint32_t);
    BITS(struct pxcap, pxdc.iflr, 0x08 * 8 + 15, 1, uint16_t);
    BITS(struct pxcap, pxlc.ccc, 0x10 * 8 + 6, 1, uint16_t);
    BITS(struct pxcap, pxdc2.ltr_en, 0x28 * 8 + 10, 1, uint32_t);
    BITS(struct pxcap, pxdcap2.frss, 0x24 * 8 + 31, 1, uint32_t);
}

/* ---- the kernel constants the headers lean on ---- */

static void
test_kernel_constants(void)
{
    MACRO_V(PCI_STD_HEADER_SIZEOF, 64);
    MACRO_V(PCI_CFG_SPACE_SIZE, 256);
    MACRO_V(PCI_CAP_LIST_ID, 0);
    MACRO_V(PCI_CAP_LIST_NEXT, 1);
    MACRO_V(PCI_EXT_CAP_DSN_SIZEOF, 12);
    MACRO_V(PCI_MSIX_FLAGS, 2);
    MACRO_V(PCI_MSIX_TABLE, 4);
    MACRO_V(PCI_MSIX_PBA, 8);
    MACRO_V(PCI_CAP_MSIX_SIZEOF, 12);
    MACRO_V(PCI_PM_SIZEOF, 8);
    IS_MACRO(LINUX_VERSION_CODE);
    IS_MACRO(VFIO_API_VERSION);
}

int
main(void)
{
    test_vfio_user_h();
    test_pci_defs_h();
    test_caps_common_h();
    test_caps_dsn_h();
    test_caps_msi_h();
    test_caps_msix_h();
    test_caps_pm_h();
    test_caps_px_h();
    test_kernel_constants();

    return abi_summary();
}
