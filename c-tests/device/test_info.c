/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * DEVICE_GET_INFO, DEVICE_GET_REGION_INFO (including the sparse mmap
 * capability and the region fd) and DEVICE_GET_IRQ_INFO.
 */

#define _GNU_SOURCE

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "client.h"
#include "device.h"

static void
check_device_info(int sock)
{
    struct vfio_user_device_info in = { .argsz = sizeof(in) };
    const struct vfio_user_device_info *out;
    struct reply r;
    uint8_t big[64] = { 0 };

    if (client_call(sock, VFIO_USER_DEVICE_GET_INFO, &in, sizeof(in), NULL, 0, &r) < 0) {
        t_fail("get-info", "no reply: %s", strerror(errno));
        return;
    }
    if (t_check("get-info", reply_is_ok(&r) && r.len == sizeof(*out),
                "flags %#x error_no %u, body %zu bytes", r.hdr.flags, r.hdr.error_no,
                r.len)) {
        out = (const void *)r.body;
        t_check_u64("get-info-argsz", out->argsz, sizeof(*out));
        t_check_u64("get-info-flags", out->flags,
                    VFIO_DEVICE_FLAGS_PCI | VFIO_DEVICE_FLAGS_RESET);
        t_check_u64("get-info-num-regions", out->num_regions, 9);
        t_check_u64("get-info-num-irqs", out->num_irqs, 5);
        t_check_u64("get-info-no-fds", r.nr_fds, 0);
    }
    reply_free(&r);

    /* A larger argsz gets the same 16 bytes back. */
    in.argsz = sizeof(big);
    memcpy(big, &in, sizeof(in));
    if (client_call(sock, VFIO_USER_DEVICE_GET_INFO, big, sizeof(big), NULL, 0, &r) == 0) {
        out = (const void *)r.body;
        t_check("get-info-large-argsz", reply_is_ok(&r) && r.len == sizeof(*out) &&
                out->argsz == sizeof(*out) && out->num_regions == 9,
                "flags %#x body %zu bytes", r.hdr.flags, r.len);
        reply_free(&r);
    } else {
        t_fail("get-info-large-argsz", "no reply: %s", strerror(errno));
    }

    in.argsz = sizeof(in) - 1;
    if (client_call(sock, VFIO_USER_DEVICE_GET_INFO, &in, sizeof(in), NULL, 0, &r) == 0) {
        t_check("get-info-small-argsz-einval", reply_is_error(&r, EINVAL) && r.len == 0,
                "flags %#x error_no %u body %zu", r.hdr.flags, r.hdr.error_no, r.len);
        reply_free(&r);
    } else {
        t_fail("get-info-small-argsz-einval", "no reply: %s", strerror(errno));
    }

    in.argsz = sizeof(in);
    if (client_call(sock, VFIO_USER_DEVICE_GET_INFO, &in, 8, NULL, 0, &r) == 0) {
        t_check("get-info-short-body-einval", reply_is_error(&r, EINVAL),
                "flags %#x error_no %u", r.hdr.flags, r.hdr.error_no);
        reply_free(&r);
    } else {
        t_fail("get-info-short-body-einval", "no reply: %s", strerror(errno));
    }
}

/* GET_REGION_INFO with the given argsz and a body of body_len bytes. */
static int
region_info(int sock, uint32_t index, uint32_t argsz, size_t body_len,
            struct reply *r)
{
    uint8_t body[256] = { 0 };
    struct vfio_region_info in = { .argsz = argsz, .index = index };

    memcpy(body, &in, sizeof(in) < body_len ? sizeof(in) : body_len);
    return client_call(sock, VFIO_USER_DEVICE_GET_REGION_INFO, body, body_len,
                       NULL, 0, r);
}

/* Checks a plain (capability-less) region's info. */
static void
check_plain_region(int sock, const char *name, uint32_t index, uint32_t flags,
                   uint64_t size)
{
    const struct vfio_region_info *info;
    char sub[96];
    struct reply r;

    if (region_info(sock, index, sizeof(*info) + 8, sizeof(*info), &r) < 0) {
        t_fail(name, "no reply: %s", strerror(errno));
        return;
    }
    if (t_check(name, reply_is_ok(&r) && r.len == sizeof(*info),
                "flags %#x error_no %u, body %zu bytes", r.hdr.flags, r.hdr.error_no,
                r.len)) {
        info = (const void *)r.body;
        snprintf(sub, sizeof(sub), "%s-argsz", name);
        t_check_u64(sub, info->argsz, sizeof(*info));
        snprintf(sub, sizeof(sub), "%s-flags", name);
        t_check_u64(sub, info->flags, flags);
        snprintf(sub, sizeof(sub), "%s-index", name);
        t_check_u64(sub, info->index, index);
        snprintf(sub, sizeof(sub), "%s-cap-offset", name);
        t_check_u64(sub, info->cap_offset, 0);
        snprintf(sub, sizeof(sub), "%s-size", name);
        t_check_u64(sub, info->size, size);
        snprintf(sub, sizeof(sub), "%s-no-fds", name);
        t_check_u64(sub, r.nr_fds, 0);
    }
    reply_free(&r);
}

static void
check_region_info_errors(int sock)
{
    struct reply r;

    if (region_info(sock, VFU_PCI_DEV_NUM_REGIONS, 32, 32, &r) == 0) {
        t_check("region-info-bad-index-einval", reply_is_error(&r, EINVAL),
                "flags %#x error_no %u", r.hdr.flags, r.hdr.error_no);
        reply_free(&r);
    } else {
        t_fail("region-info-bad-index-einval", "no reply: %s", strerror(errno));
    }
    if (region_info(sock, 0xffffffff, 32, 32, &r) == 0) {
        t_check("region-info-huge-index-einval", reply_is_error(&r, EINVAL),
                "flags %#x error_no %u", r.hdr.flags, r.hdr.error_no);
        reply_free(&r);
    } else {
        t_fail("region-info-huge-index-einval", "no reply: %s", strerror(errno));
    }
    if (region_info(sock, 0, 31, 32, &r) == 0) {
        t_check("region-info-small-argsz-einval", reply_is_error(&r, EINVAL),
                "flags %#x error_no %u", r.hdr.flags, r.hdr.error_no);
        reply_free(&r);
    } else {
        t_fail("region-info-small-argsz-einval", "no reply: %s", strerror(errno));
    }
    if (region_info(sock, 0, 32, 8, &r) == 0) {
        t_check("region-info-short-body-einval", reply_is_error(&r, EINVAL) &&
                r.nr_fds == 0, "flags %#x error_no %u fds %zu", r.hdr.flags,
                r.hdr.error_no, r.nr_fds);
        reply_free(&r);
    } else {
        t_fail("region-info-short-body-einval", "no reply: %s", strerror(errno));
    }
}

/* BAR0: sparse areas and the memfd. */
static void
check_bar0(int sock, int memfd)
{
    const size_t full = sizeof(struct vfio_region_info) +
                        sizeof(struct vfio_region_info_cap_sparse_mmap) +
                        2 * sizeof(struct vfio_region_sparse_mmap_area);
    const struct vfio_region_info *info;
    struct stat mine, theirs;
    struct reply r;
    uint32_t argsz;

    t_check_u64("bar0-expected-full-argsz", full, 80);

    /* Too small for the capability: the needed size, no caps, no fd. */
    if (region_info(sock, VFU_PCI_DEV_BAR0_REGION_IDX, sizeof(*info), sizeof(*info),
                    &r) < 0) {
        t_fail("bar0-small", "no reply: %s", strerror(errno));
        return;
    }
    if (t_check("bar0-small", reply_is_ok(&r) && r.len == sizeof(*info),
                "flags %#x error_no %u body %zu", r.hdr.flags, r.hdr.error_no, r.len)) {
        info = (const void *)r.body;
        t_check_u64("bar0-small-argsz-needed", info->argsz, full);
        t_check_u64("bar0-small-flags", info->flags, VFIO_REGION_INFO_FLAG_READ |
                    VFIO_REGION_INFO_FLAG_WRITE | VFIO_REGION_INFO_FLAG_MMAP);
        t_check_u64("bar0-small-index", info->index, VFU_PCI_DEV_BAR0_REGION_IDX);
        t_check_u64("bar0-small-cap-offset", info->cap_offset, 0);
        t_check_u64("bar0-small-size", info->size, DEV_BAR0_SIZE);
        t_check_u64("bar0-small-offset", info->offset, DEV_BAR0_FILE_OFFSET);
        t_check_u64("bar0-small-no-fds", r.nr_fds, 0);
    }
    reply_free(&r);

    /* Big enough (and bigger, with only the 32-byte struct in the body). */
    for (argsz = (uint32_t)full; argsz <= 128; argsz += 128 - (uint32_t)full) {
        const struct vfio_region_info_cap_sparse_mmap *sparse;
        char name[64], sub[96];

        snprintf(name, sizeof(name), "bar0-argsz-%u", argsz);
        if (region_info(sock, VFU_PCI_DEV_BAR0_REGION_IDX, argsz, sizeof(*info), &r) < 0) {
            t_fail(name, "no reply: %s", strerror(errno));
            continue;
        }
        if (!t_check(name, reply_is_ok(&r) && r.len == full,
                     "flags %#x error_no %u body %zu bytes", r.hdr.flags, r.hdr.error_no,
                     r.len)) {
            reply_free(&r);
            continue;
        }
        info = (const void *)r.body;
        sparse = (const void *)(r.body + sizeof(*info));
        snprintf(sub, sizeof(sub), "%s-argsz", name);
        t_check_u64(sub, info->argsz, full);
        snprintf(sub, sizeof(sub), "%s-flags", name);
        t_check_u64(sub, info->flags, VFIO_REGION_INFO_FLAG_READ |
                    VFIO_REGION_INFO_FLAG_WRITE | VFIO_REGION_INFO_FLAG_MMAP |
                    VFIO_REGION_INFO_FLAG_CAPS);
        snprintf(sub, sizeof(sub), "%s-cap-offset", name);
        t_check_u64(sub, info->cap_offset, sizeof(*info));
        snprintf(sub, sizeof(sub), "%s-size", name);
        t_check_u64(sub, info->size, DEV_BAR0_SIZE);
        snprintf(sub, sizeof(sub), "%s-offset", name);
        t_check_u64(sub, info->offset, DEV_BAR0_FILE_OFFSET);
        snprintf(sub, sizeof(sub), "%s-sparse-header", name);
        t_check(sub, sparse->header.id == VFIO_REGION_INFO_CAP_SPARSE_MMAP &&
                sparse->header.version == 1 && sparse->header.next == 0,
                "id %u version %u next %u", sparse->header.id, sparse->header.version,
                sparse->header.next);
        snprintf(sub, sizeof(sub), "%s-sparse-nr-areas", name);
        t_check_u64(sub, sparse->nr_areas, 2);
        snprintf(sub, sizeof(sub), "%s-sparse-areas", name);
        t_check(sub, sparse->areas[0].offset == 0x1000 && sparse->areas[0].size == 0x1000 &&
                sparse->areas[1].offset == 0x3000 && sparse->areas[1].size == 0x1000,
                "areas [%#llx+%#llx] [%#llx+%#llx]",
                (unsigned long long)sparse->areas[0].offset,
                (unsigned long long)sparse->areas[0].size,
                (unsigned long long)sparse->areas[1].offset,
                (unsigned long long)sparse->areas[1].size);

        snprintf(sub, sizeof(sub), "%s-one-fd", name);
        if (t_check(sub, r.nr_fds == 1, "%zu fds", r.nr_fds)) {
            snprintf(sub, sizeof(sub), "%s-fd-same-file", name);
            t_check(sub, fstat(memfd, &mine) == 0 && fstat(r.fds[0], &theirs) == 0 &&
                    mine.st_ino == theirs.st_ino && mine.st_dev == theirs.st_dev,
                    "inode %lu/%lu, want %lu/%lu", (unsigned long)theirs.st_dev,
                    (unsigned long)theirs.st_ino, (unsigned long)mine.st_dev,
                    (unsigned long)mine.st_ino);

            /* The received fd maps the second sparse area. */
            const uint32_t magic = 0x5a17c0de;
            off_t where = (off_t)info->offset + (off_t)sparse->areas[1].offset;
            snprintf(sub, sizeof(sub), "%s-fd-mappable", name);
            if (pwrite(memfd, &magic, sizeof(magic), where + 0x10) == sizeof(magic)) {
                void *p = mmap(NULL, sparse->areas[1].size, PROT_READ | PROT_WRITE,
                               MAP_SHARED, r.fds[0], where);
                if (p == MAP_FAILED) {
                    t_fail(sub, "mmap: %s", strerror(errno));
                } else {
                    uint32_t got;
                    memcpy(&got, (char *)p + 0x10, sizeof(got));
                    t_check_u64(sub, got, magic);
                    munmap(p, sparse->areas[1].size);
                }
            } else {
                t_fail(sub, "pwrite: %s", strerror(errno));
            }
        }
        reply_free(&r);
    }
}

static void
check_irq_info(int sock)
{
    static const uint32_t counts[VFU_DEV_NUM_IRQS] = { 1, 0, DEV_MSIX_VECTORS, 1, 1 };
    uint32_t i;

    for (i = 0; i <= VFU_DEV_NUM_IRQS; i++) {
        struct vfio_irq_info in = { .argsz = sizeof(in), .index = i };
        const struct vfio_irq_info *out;
        char name[64];
        struct reply r;

        snprintf(name, sizeof(name), "irq-info-%u", i);
        if (client_call(sock, VFIO_USER_DEVICE_GET_IRQ_INFO, &in, sizeof(in), NULL, 0,
                        &r) < 0) {
            t_fail(name, "no reply: %s", strerror(errno));
            continue;
        }
        if (i == VFU_DEV_NUM_IRQS) {
            t_check(name, reply_is_error(&r, EINVAL), "flags %#x error_no %u",
                    r.hdr.flags, r.hdr.error_no);
        } else if (t_check(name, reply_is_ok(&r) && r.len == sizeof(*out),
                           "flags %#x error_no %u body %zu", r.hdr.flags,
                           r.hdr.error_no, r.len)) {
            out = (const void *)r.body;
            t_check(name, out->argsz == sizeof(*out) && out->index == i &&
                    out->count == counts[i] && out->flags == VFIO_IRQ_INFO_EVENTFD,
                    "argsz %u index %u count %u (want %u) flags %#x", out->argsz,
                    out->index, out->count, counts[i], out->flags);
        }
        reply_free(&r);
    }
}

int
main(void)
{
    struct device_server_args args;
    char path[108];
    pid_t pid;
    int sock;

    pid = device_test_start("info", path, sizeof(path), &args, device_serve_one_client);
    if (pid < 0) {
        return t_status();
    }

    sock = client_connect(path, CLIENT_TIMEOUT_MS);
    if (sock < 0 || client_negotiate(sock) < 0) {
        t_fail("connect", "%s", strerror(errno));
    } else {
        check_device_info(sock);
        check_bar0(sock, args.memfd);
        check_plain_region(sock, "bar1-info", VFU_PCI_DEV_BAR1_REGION_IDX,
                           VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE,
                           DEV_BAR1_SIZE);
        check_plain_region(sock, "bar2-info", VFU_PCI_DEV_BAR2_REGION_IDX,
                           VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE,
                           DEV_BAR2_SIZE);
        check_plain_region(sock, "bar3-unused-info", VFU_PCI_DEV_BAR3_REGION_IDX, 0, 0);
        check_plain_region(sock, "rom-unused-info", VFU_PCI_DEV_ROM_REGION_IDX, 0, 0);
        check_plain_region(sock, "config-info", VFU_PCI_DEV_CFG_REGION_IDX,
                           VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE,
                           PCI_CFG_SPACE_SIZE);
        check_region_info_errors(sock);
        check_irq_info(sock);
    }
    if (sock >= 0) {
        close(sock);
    }
    t_wait_child("server-exit", pid, 20000);
    close(args.memfd);
    (void) unlink(path);
    return t_status();
}
