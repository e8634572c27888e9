/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * REGION_READ / REGION_WRITE: callback-backed BARs, bounds checking, errors
 * from callbacks, and the emulated PCI configuration space (IDs, class,
 * BAR sizing, command register and the capability list).
 */

#define _GNU_SOURCE

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "client.h"
#include "device.h"

#define CFG VFU_PCI_DEV_CFG_REGION_IDX

static void
server_main(void *arg)
{
    struct device_server_args *a = arg;
    static struct test_device dev;
    vfu_pci_config_space_t *cfg;
    int ret, err;

    if (device_setup(&dev, a->path, a->memfd) < 0) {
        return;
    }
    t_check("server-add-pm-at-0x40", dev.pm_pos == 0x40, "PM placed at %#zx",
            (size_t)dev.pm_pos);
    t_check("server-add-msix-at-0x48", dev.msix_pos == 0x48, "MSI-X placed at %#zx",
            (size_t)dev.msix_pos);
    errno = 0;
    t_check("server-find-missing-cap", vfu_pci_find_capability(dev.ctx, false,
                                                              PCI_CAP_ID_MSI) == 0,
            "found MSI, which was never added");

    ret = device_serve_one(&dev);
    err = errno;
    t_check("server-run-ends-enotconn", ret == -1 && err == ENOTCONN,
            "ret %d errno %d (%s)", ret, err, strerror(err));

    /* What the client wrote is what the device sees. */
    cfg = vfu_pci_get_config_space(dev.ctx);
    t_check("server-sees-bar0-address", cfg != NULL &&
            cfg->hdr.bars[0].raw == 0xfebc0000u, "BAR0 %#x",
            cfg != NULL ? cfg->hdr.bars[0].raw : 0);
    t_check("server-sees-command", cfg != NULL && cfg->hdr.cmd.mse == 1 &&
            cfg->hdr.cmd.bme == 1 && cfg->hdr.cmd.iose == 0, "command %#x",
            cfg != NULL ? cfg->hdr.cmd.raw : 0);
    t_check("server-sees-bar1-data", memcmp(dev.bar1 + 0x20, "ABCDEFGH", 8) == 0,
            "BAR1 memory differs");
    t_check("server-callback-ctx", dev.bad_ctx == 0 && dev.accesses > 0,
            "%lu of %lu callback calls had a wrong ctx or range", dev.bad_ctx,
            dev.accesses);
    device_destroy(&dev);
}

static int sock;

static uint32_t
cfg_read(const char *name, uint64_t off, uint32_t count)
{
    uint32_t v = 0;
    int ret = client_region_read(sock, CFG, off, count, &v);

    if (ret != 0) {
        t_fail(name, "config read at %#" PRIx64 " failed: %d", off, ret);
        return 0xdeadbeef;
    }
    return v;
}

static void
cfg_write(const char *name, uint64_t off, uint32_t count, uint32_t v)
{
    int ret = client_region_write(sock, CFG, off, count, &v);

    if (ret != 0) {
        t_fail(name, "config write at %#" PRIx64 " failed: %d", off, ret);
    }
}

/* An access that must fail with `want` (an errno). */
static void
expect_access_error(const char *name, uint16_t cmd, uint32_t region,
                    uint64_t offset, uint32_t count, size_t data_len, int want)
{
    size_t len = sizeof(struct vfio_user_region_access) + data_len;
    struct vfio_user_region_access *ra = calloc(1, len);
    struct reply r;

    if (ra == NULL) {
        t_fail(name, "calloc");
        return;
    }
    ra->offset = offset;
    ra->region = region;
    ra->count = count;
    if (client_call(sock, cmd, ra, len, NULL, 0, &r) < 0) {
        t_fail(name, "no reply: %s", strerror(errno));
    } else {
        t_check(name, reply_is_error(&r, want) && r.len == 0,
                "flags %#x error_no %u body %zu, want errno %d", r.hdr.flags,
                r.hdr.error_no, r.len, want);
        reply_free(&r);
    }
    free(ra);
}

static void
check_bar_data(void)
{
    uint8_t buf[64];
    uint32_t v = 0xdeadbeef, got = 0;
    int ret;

    ret = client_region_write(sock, VFU_PCI_DEV_BAR1_REGION_IDX, 0x10, 4, &v);
    t_check("bar1-write", ret == 0, "ret %d", ret);
    ret = client_region_read(sock, VFU_PCI_DEV_BAR1_REGION_IDX, 0x10, 4, &got);
    t_check("bar1-read-back", ret == 0 && got == v, "ret %d got %#x", ret, got);

    ret = client_region_write(sock, VFU_PCI_DEV_BAR1_REGION_IDX, 0x20, 8, "ABCDEFGH");
    t_check("bar1-write-8", ret == 0, "ret %d", ret);
    memset(buf, 0, sizeof(buf));
    ret = client_region_read(sock, VFU_PCI_DEV_BAR1_REGION_IDX, 0x22, 4, buf);
    t_check("bar1-read-at-offset", ret == 0 && memcmp(buf, "CDEF", 4) == 0,
            "ret %d got \"%.4s\"", ret, (char *)buf);
    ret = client_region_read(sock, VFU_PCI_DEV_BAR1_REGION_IDX, 0x27, 1, buf);
    t_check("bar1-read-one-byte", ret == 0 && buf[0] == 'H', "ret %d got %#x", ret,
            buf[0]);
    /* The bytes around the write were not touched. */
    ret = client_region_read(sock, VFU_PCI_DEV_BAR1_REGION_IDX, 0x1e, 12, buf);
    t_check("bar1-write-bounded", ret == 0 && buf[0] == 0 && buf[1] == 0 &&
            memcmp(buf + 2, "ABCDEFGH", 8) == 0 && buf[10] == 0 && buf[11] == 0,
            "ret %d", ret);

    for (size_t i = 0; i < sizeof(buf); i++) {
        buf[i] = (uint8_t)(i * 7 + 3);
    }
    ret = client_region_write(sock, VFU_PCI_DEV_BAR0_REGION_IDX, 0x40, 64, buf);
    t_check("bar0-write-64", ret == 0, "ret %d", ret);
    {
        uint8_t back[64] = { 0 };
        ret = client_region_read(sock, VFU_PCI_DEV_BAR0_REGION_IDX, 0x40, 64, back);
        t_check("bar0-read-back-64", ret == 0 && memcmp(back, buf, 64) == 0, "ret %d", ret);
    }

    /* The last bytes of BAR2 are in bounds. */
    ret = client_region_write(sock, VFU_PCI_DEV_BAR2_REGION_IDX, DEV_BAR2_SIZE - 8, 8,
                              "lastbyte");
    t_check("bar2-write-at-end", ret == 0, "ret %d", ret);
    memset(buf, 0, sizeof(buf));
    ret = client_region_read(sock, VFU_PCI_DEV_BAR2_REGION_IDX, DEV_BAR2_SIZE - 8, 8, buf);
    t_check("bar2-read-at-end", ret == 0 && memcmp(buf, "lastbyte", 8) == 0, "ret %d", ret);
}

static void
check_bounds(void)
{
    expect_access_error("bar1-read-straddles-end-einval", VFIO_USER_REGION_READ,
                        VFU_PCI_DEV_BAR1_REGION_IDX, DEV_BAR1_SIZE - 4, 8, 0, EINVAL);
    expect_access_error("bar1-read-past-end-einval", VFIO_USER_REGION_READ,
                        VFU_PCI_DEV_BAR1_REGION_IDX, DEV_BAR1_SIZE, 1, 0, EINVAL);
    expect_access_error("bar1-read-offset-wraps-einval", VFIO_USER_REGION_READ,
                        VFU_PCI_DEV_BAR1_REGION_IDX, UINT64_MAX - 1, 4, 0, EINVAL);
    expect_access_error("bar2-write-straddles-end-einval", VFIO_USER_REGION_WRITE,
                        VFU_PCI_DEV_BAR2_REGION_IDX, DEV_BAR2_SIZE - 4, 8, 8, EINVAL);
    expect_access_error("bad-region-index-einval", VFIO_USER_REGION_READ,
                        VFU_PCI_DEV_NUM_REGIONS, 0, 4, 0, EINVAL);
    expect_access_error("huge-region-index-einval", VFIO_USER_REGION_READ,
                        0xffffffff, 0, 4, 0, EINVAL);
    expect_access_error("unused-region-einval", VFIO_USER_REGION_READ,
                        VFU_PCI_DEV_BAR4_REGION_IDX, 0, 4, 0, EINVAL);
    expect_access_error("write-count-above-data-einval", VFIO_USER_REGION_WRITE,
                        VFU_PCI_DEV_BAR1_REGION_IDX, 0, 8, 4, EINVAL);
    expect_access_error("write-count-below-data-einval", VFIO_USER_REGION_WRITE,
                        VFU_PCI_DEV_BAR1_REGION_IDX, 0, 4, 8, EINVAL);
    expect_access_error("read-count-above-max-einval", VFIO_USER_REGION_READ,
                        VFU_PCI_DEV_BAR2_REGION_IDX, 0, 1024 * 1024 + 1, 0, EINVAL);
    expect_access_error("config-read-past-end-einval", VFIO_USER_REGION_READ,
                        CFG, PCI_CFG_SPACE_SIZE - 2, 4, 0, EINVAL);

    /* A body shorter than struct vfio_user_region_access. */
    {
        uint8_t body[8] = { 0 };
        struct reply r;

        if (client_call(sock, VFIO_USER_REGION_READ, body, sizeof(body), NULL, 0, &r) < 0) {
            t_fail("read-short-body-einval", "no reply: %s", strerror(errno));
        } else {
            t_check("read-short-body-einval", reply_is_error(&r, EINVAL),
                    "flags %#x error_no %u", r.hdr.flags, r.hdr.error_no);
            reply_free(&r);
        }
    }

    /* Errors reported by the device's callback. */
    expect_access_error("callback-read-eio", VFIO_USER_REGION_READ,
                        VFU_PCI_DEV_BAR1_REGION_IDX, DEV_BAR1_EIO_OFF, 4, 0, EIO);
    expect_access_error("callback-write-eio", VFIO_USER_REGION_WRITE,
                        VFU_PCI_DEV_BAR1_REGION_IDX, DEV_BAR1_EIO_OFF, 4, 4, EIO);
    expect_access_error("callback-short-read-einval", VFIO_USER_REGION_READ,
                        VFU_PCI_DEV_BAR1_REGION_IDX, DEV_BAR1_SHORT_OFF, 4, 0, EINVAL);
    expect_access_error("callback-short-write-einval", VFIO_USER_REGION_WRITE,
                        VFU_PCI_DEV_BAR1_REGION_IDX, DEV_BAR1_SHORT_OFF, 4, 4, EINVAL);

    /* After all that the device still answers. */
    {
        uint32_t got = 0;
        int ret = client_region_read(sock, VFU_PCI_DEV_BAR1_REGION_IDX, 0x10, 4, &got);
        t_check("still-serving-after-errors", ret == 0 && got == 0xdeadbeef,
                "ret %d got %#x", ret, got);
    }
}

static void
check_config_header(void)
{
    uint8_t whole[PCI_CFG_SPACE_SIZE];
    uint32_t v;
    int ret;

    v = cfg_read("config-ids", 0, 4);
    t_check_u64("config-ids", v, DEV_VID | ((uint32_t)DEV_DID << 16));
    t_check_u64("config-vendor-id-16", cfg_read("config-vendor-id-16", 0, 2), DEV_VID);
    t_check_u64("config-device-id-16", cfg_read("config-device-id-16", 2, 2), DEV_DID);
    t_check_u64("config-subsystem-vendor", cfg_read("config-subsystem-vendor", 0x2c, 2),
                DEV_SSVID);
    t_check_u64("config-subsystem-id", cfg_read("config-subsystem-id", 0x2e, 2), DEV_SSID);
    t_check_u64("config-class", cfg_read("config-class", 0x09, 3),
                DEV_PROGIF | (DEV_SUBCLASS << 8) | (DEV_CLASS << 16));
    t_check_u64("config-header-type", cfg_read("config-header-type", 0x0e, 1),
                PCI_HEADER_TYPE_NORMAL);
    v = cfg_read("config-status-cap-list", PCI_STATUS, 2);
    t_check("config-status-cap-list", (v & PCI_STATUS_CAP_LIST) != 0, "status %#x", v);
    t_check_u64("config-interrupt-pin", cfg_read("config-interrupt-pin",
                                                 PCI_INTERRUPT_PIN, 1), 1);

    memset(whole, 0, sizeof(whole));
    ret = client_region_read(sock, CFG, 0, sizeof(whole), whole);
    t_check("config-read-whole", ret == 0 && whole[0] == (DEV_VID & 0xff) &&
            whole[1] == (DEV_VID >> 8) && whole[0x0b] == DEV_CLASS &&
            whole[PCI_CAPABILITY_LIST] == 0x40, "ret %d", ret);

    /* Command register: memory space and bus master. */
    cfg_write("config-command", PCI_COMMAND, 2, PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER);
    t_check_u64("config-command", cfg_read("config-command", PCI_COMMAND, 2),
                PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER);
}

static void
check_bar_sizing(void)
{
    t_check_u64("bar0-initial", cfg_read("bar0-initial", PCI_BASE_ADDRESS_0, 4), 0);
    t_check_u64("bar1-initial-io", cfg_read("bar1-initial-io", PCI_BASE_ADDRESS_1, 4),
                PCI_BASE_ADDRESS_SPACE_IO);
    t_check_u64("bar2-initial-64-prefetch", cfg_read("bar2-initial-64-prefetch",
                                                     PCI_BASE_ADDRESS_2, 4),
                PCI_BASE_ADDRESS_MEM_TYPE_64 | PCI_BASE_ADDRESS_MEM_PREFETCH);

    cfg_write("bar0-size-probe", PCI_BASE_ADDRESS_0, 4, 0xffffffff);
    t_check_u64("bar0-size-mask", cfg_read("bar0-size-mask", PCI_BASE_ADDRESS_0, 4),
                (uint32_t)~(DEV_BAR0_SIZE - 1));
    cfg_write("bar1-size-probe", PCI_BASE_ADDRESS_1, 4, 0xffffffff);
    t_check_u64("bar1-size-mask", cfg_read("bar1-size-mask", PCI_BASE_ADDRESS_1, 4),
                (uint32_t)~(DEV_BAR1_SIZE - 1) | PCI_BASE_ADDRESS_SPACE_IO);
    cfg_write("bar2-size-probe", PCI_BASE_ADDRESS_2, 4, 0xffffffff);
    t_check_u64("bar2-size-mask", cfg_read("bar2-size-mask", PCI_BASE_ADDRESS_2, 4),
                (uint32_t)~(DEV_BAR2_SIZE - 1) | PCI_BASE_ADDRESS_MEM_TYPE_64 |
                PCI_BASE_ADDRESS_MEM_PREFETCH);

    /* Programming addresses keeps only the address bits the size allows. */
    cfg_write("bar0-program", PCI_BASE_ADDRESS_0, 4, 0xfebc1234);
    t_check_u64("bar0-program", cfg_read("bar0-program", PCI_BASE_ADDRESS_0, 4),
                0xfebc0000);
    cfg_write("bar1-program", PCI_BASE_ADDRESS_1, 4, 0xc0f1);
    t_check_u64("bar1-program", cfg_read("bar1-program", PCI_BASE_ADDRESS_1, 4),
                0xc000 | PCI_BASE_ADDRESS_SPACE_IO);
}

static void
check_capabilities(void)
{
    uint32_t pos, walked[8], ids[8];
    uint16_t lib[4];
    size_t n = 0;
    int ret;

    pos = cfg_read("cap-pointer", PCI_CAPABILITY_LIST, 1);
    t_check_u64("cap-pointer", pos, 0x40);

    while (pos != 0 && n < 8) {
        uint32_t hdr = cfg_read("cap-walk", pos, 2);

        walked[n] = pos;
        ids[n] = hdr & 0xff;
        n++;
        pos = (hdr >> 8) & 0xff;
    }
    t_check("cap-walk", n == 2 && walked[0] == 0x40 && ids[0] == PCI_CAP_ID_PM &&
            walked[1] == 0x48 && ids[1] == PCI_CAP_ID_MSIX,
            "%zu caps: [%#x id %#x] [%#x id %#x]", n, n > 0 ? walked[0] : 0,
            n > 0 ? ids[0] : 0, n > 1 ? walked[1] : 0, n > 1 ? ids[1] : 0);

    /* The server's vfu_pci_find_*capability() results, stored in BAR1. */
    memset(lib, 0xff, sizeof(lib));
    ret = client_region_read(sock, VFU_PCI_DEV_BAR1_REGION_IDX, DEV_BAR1_CAPS_OFF,
                             sizeof(lib), lib);
    if (t_check("cap-find-results-read", ret == 0, "ret %d", ret) && n == 2) {
        t_check_u64("cap-find-pm-agrees", lib[0], walked[0]);
        t_check_u64("cap-find-msix-agrees", lib[1], walked[1]);
        t_check_u64("cap-find-next-from-pm", lib[2], walked[1]);
        t_check_u64("cap-find-next-from-msix-none", lib[3], 0);
    }

    if (n == 2) {
        t_check_u64("cap-pm-pmc", cfg_read("cap-pm-pmc", walked[0] + PCI_PM_PMC, 2), 3);
        t_check_u64("cap-pm-pmcsr", cfg_read("cap-pm-pmcsr", walked[0] + PCI_PM_CTRL, 2),
                    PCI_PM_CTRL_NO_SOFT_RESET);
        t_check_u64("cap-msix-table-size",
                    cfg_read("cap-msix-table-size", walked[1] + PCI_MSIX_FLAGS, 2) &
                    PCI_MSIX_FLAGS_QSIZE, DEV_MSIX_VECTORS - 1);
        t_check_u64("cap-msix-table", cfg_read("cap-msix-table", walked[1] + PCI_MSIX_TABLE,
                                               4), DEV_MSIX_TABLE_OFF);
        t_check_u64("cap-msix-pba", cfg_read("cap-msix-pba", walked[1] + PCI_MSIX_PBA, 4),
                    DEV_MSIX_PBA_OFF);
    }
}

int
main(void)
{
    struct device_server_args args;
    char path[108];
    pid_t pid;

    pid = device_test_start("region", path, sizeof(path), &args, server_main);
    if (pid < 0) {
        return t_status();
    }

    sock = client_connect(path, CLIENT_TIMEOUT_MS);
    if (sock < 0 || client_negotiate(sock) < 0) {
        t_fail("connect", "%s", strerror(errno));
    } else {
        check_bar_data();
        check_bounds();
        check_config_header();
        check_bar_sizing();
        check_capabilities();
    }
    if (sock >= 0) {
        close(sock);
    }
    t_wait_child("server-exit", pid, 20000);
    close(args.memfd);
    (void) unlink(path);
    return t_status();
}
