/* SPDX-License-Identifier: BSD-3-Clause */
/* Server side of the device-core tests: one emulated PCI device. */

#define _GNU_SOURCE

#include "device.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "client.h"

void
device_log(vfu_ctx_t *ctx, int level, const char *msg)
{
    (void) ctx;
    if (getenv("VFU_TEST_LOG") != NULL) {
        fprintf(stderr, "[server %ld] <%d> %s\n", (long)getpid(), level, msg);
    }
}

static struct test_device *
dev_of(vfu_ctx_t *ctx)
{
    return vfu_get_private(ctx);
}

/* Plain memory behind a callback; counts calls and checks the ctx. */
static ssize_t
mem_access(struct test_device *d, vfu_ctx_t *ctx, uint8_t *mem, size_t size,
           char *buf, size_t count, loff_t offset, bool is_write)
{
    d->accesses++;
    if (ctx != d->ctx) {
        d->bad_ctx++;
    }
    if (offset < 0 || (size_t)offset > size || count > size - (size_t)offset) {
        /* The library must never ask for this: make it visible. */
        d->bad_ctx++;
        errno = EFAULT;
        return -1;
    }
    if (is_write) {
        memcpy(mem + offset, buf, count);
    } else {
        memcpy(buf, mem + offset, count);
    }
    return (ssize_t)count;
}

static ssize_t
bar0_cb(vfu_ctx_t *ctx, char *buf, size_t count, loff_t offset, bool is_write)
{
    struct test_device *d = dev_of(ctx);

    return mem_access(d, ctx, d->bar0, sizeof(d->bar0), buf, count, offset,
                      is_write);
}

static ssize_t
bar1_cb(vfu_ctx_t *ctx, char *buf, size_t count, loff_t offset, bool is_write)
{
    struct test_device *d = dev_of(ctx);

    if (count == 4 && offset == DEV_BAR1_EIO_OFF) {
        d->accesses++;
        errno = EIO;
        return -1;
    }
    if (count == 4 && offset == DEV_BAR1_SHORT_OFF) {
        d->accesses++;
        if (!is_write) {
            memset(buf, 0xee, 3);
        }
        return 3;
    }
    if (count == 4 && offset == DEV_BAR1_FDCOUNT_OFF && !is_write) {
        uint32_t n = (uint32_t)t_count_fds();

        d->accesses++;
        memcpy(buf, &n, sizeof(n));
        return 4;
    }
    if (count == 4 && offset == DEV_BAR1_RESETS_OFF) {
        uint32_t n = (uint32_t)d->nr_resets;

        d->accesses++;
        if (is_write) {
            memcpy(&n, buf, sizeof(n));
            d->fail_resets = (int)n;
        } else {
            memcpy(buf, &n, sizeof(n));
        }
        return 4;
    }
    return mem_access(d, ctx, d->bar1, sizeof(d->bar1), buf, count, offset,
                      is_write);
}

static ssize_t
bar2_cb(vfu_ctx_t *ctx, char *buf, size_t count, loff_t offset, bool is_write)
{
    struct test_device *d = dev_of(ctx);

    return mem_access(d, ctx, d->bar2, DEV_BAR2_SIZE, buf, count, offset,
                      is_write);
}

static int
reset_cb(vfu_ctx_t *ctx, vfu_reset_type_t type)
{
    struct test_device *d = dev_of(ctx);

    if (d == NULL || ctx != d->ctx) {
        if (d != NULL) {
            d->reset_bad_ctx++;
        }
        return 0;
    }
    if (d->nr_resets < DEV_MAX_RESETS) {
        d->resets[d->nr_resets] = (int)type;
    }
    d->nr_resets++;
    if (type == VFU_RESET_DEVICE && d->fail_resets > 0) {
        d->fail_resets--;
        errno = EIO;
        return -1;
    }
    return 0;
}

int
device_make_memfd(void)
{
    int fd = memfd_create("vfu-ctest-bar0", MFD_CLOEXEC);

    if (fd < 0) {
        return -1;
    }
    if (ftruncate(fd, DEV_BAR0_FILE_SIZE) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

static void
put_u16(uint8_t *p, size_t v)
{
    p[0] = (uint8_t)(v & 0xff);
    p[1] = (uint8_t)((v >> 8) & 0xff);
}

int
device_setup(struct test_device *d, const char *path, int memfd)
{
    struct iovec areas[2] = {
        { .iov_base = (void *)(uintptr_t)0x1000, .iov_len = 0x1000 },
        { .iov_base = (void *)(uintptr_t)0x3000, .iov_len = 0x1000 },
    };
    struct pmcap pm;
    struct msixcap msix;
    const char *step;

    memset(d, 0, sizeof(*d));
    d->memfd = memfd;
    d->pm_pos = -1;
    d->msix_pos = -1;
    d->bar2 = calloc(1, DEV_BAR2_SIZE);
    if (d->bar2 == NULL) {
        step = "calloc";
        goto fail;
    }

    step = "vfu_create_ctx";
    d->ctx = vfu_create_ctx(VFU_TRANS_SOCK, path, 0, d, VFU_DEV_TYPE_PCI);
    if (d->ctx == NULL) {
        goto fail;
    }
    step = "vfu_setup_log";
    if (vfu_setup_log(d->ctx, device_log, LOG_DEBUG) < 0) {
        goto fail;
    }
    step = "vfu_pci_init";
    if (vfu_pci_init(d->ctx, VFU_PCI_TYPE_CONVENTIONAL, PCI_HEADER_TYPE_NORMAL, 0) < 0) {
        goto fail;
    }
    vfu_pci_set_id(d->ctx, DEV_VID, DEV_DID, DEV_SSVID, DEV_SSID);
    vfu_pci_set_class(d->ctx, DEV_CLASS, DEV_SUBCLASS, DEV_PROGIF);

    step = "vfu_setup_region(BAR0)";
    if (vfu_setup_region(d->ctx, VFU_PCI_DEV_BAR0_REGION_IDX, DEV_BAR0_SIZE,
                         bar0_cb, VFU_REGION_FLAG_RW | VFU_REGION_FLAG_MEM,
                         areas, 2, memfd, DEV_BAR0_FILE_OFFSET) < 0) {
        goto fail;
    }
    step = "vfu_setup_region(BAR1)";
    if (vfu_setup_region(d->ctx, VFU_PCI_DEV_BAR1_REGION_IDX, DEV_BAR1_SIZE,
                         bar1_cb, VFU_REGION_FLAG_RW, NULL, 0, -1, 0) < 0) {
        goto fail;
    }
    step = "vfu_setup_region(BAR2)";
    if (vfu_setup_region(d->ctx, VFU_PCI_DEV_BAR2_REGION_IDX, DEV_BAR2_SIZE,
                         bar2_cb, VFU_REGION_FLAG_RW | VFU_REGION_FLAG_MEM |
                         VFU_REGION_FLAG_64_BITS | VFU_REGION_FLAG_PREFETCH,
                         NULL, 0, -1, 0) < 0) {
        goto fail;
    }

    step = "vfu_pci_add_capability(PM)";
    memset(&pm, 0, sizeof(pm));
    pm.hdr.id = PCI_CAP_ID_PM;
    pm.pc.vs = 3;
    pm.pmcs.nsfrst = 1;
    d->pm_pos = vfu_pci_add_capability(d->ctx, 0, 0, &pm);
    if (d->pm_pos < 0) {
        goto fail;
    }
    step = "vfu_pci_add_capability(MSIX)";
    memset(&msix, 0, sizeof(msix));
    msix.hdr.id = PCI_CAP_ID_MSIX;
    msix.mxc.ts = DEV_MSIX_VECTORS - 1;
    msix.mtab.tbir = 0;
    msix.mtab.to = DEV_MSIX_TABLE_OFF >> 3;
    msix.mpba.pbir = 0;
    msix.mpba.pbao = DEV_MSIX_PBA_OFF >> 3;
    d->msix_pos = vfu_pci_add_capability(d->ctx, 0, 0, &msix);
    if (d->msix_pos < 0) {
        goto fail;
    }

    step = "vfu_setup_device_nr_irqs(INTX)";
    if (vfu_setup_device_nr_irqs(d->ctx, VFU_DEV_INTX_IRQ, 1) < 0) {
        goto fail;
    }
    step = "vfu_setup_device_nr_irqs(MSIX)";
    if (vfu_setup_device_nr_irqs(d->ctx, VFU_DEV_MSIX_IRQ, DEV_MSIX_VECTORS) < 0) {
        goto fail;
    }
    step = "vfu_setup_device_reset_cb";
    if (vfu_setup_device_reset_cb(d->ctx, reset_cb) < 0) {
        goto fail;
    }
    step = "vfu_realize_ctx";
    if (vfu_realize_ctx(d->ctx) < 0) {
        goto fail;
    }

    /* What the library says about the capability list, for the client. */
    put_u16(d->bar1 + DEV_BAR1_CAPS_OFF + 0,
            vfu_pci_find_capability(d->ctx, false, PCI_CAP_ID_PM));
    put_u16(d->bar1 + DEV_BAR1_CAPS_OFF + 2,
            vfu_pci_find_capability(d->ctx, false, PCI_CAP_ID_MSIX));
    put_u16(d->bar1 + DEV_BAR1_CAPS_OFF + 4,
            vfu_pci_find_next_capability(d->ctx, false, (size_t)d->pm_pos,
                                         PCI_CAP_ID_MSIX));
    put_u16(d->bar1 + DEV_BAR1_CAPS_OFF + 6,
            vfu_pci_find_next_capability(d->ctx, false, (size_t)d->msix_pos,
                                         PCI_CAP_ID_MSIX));

    t_ok("device-setup");
    return 0;

fail:
    t_fail("device-setup", "%s failed: %s", step, strerror(errno));
    return -1;
}

int
device_serve_one(struct test_device *d)
{
    int ret;

    if (vfu_attach_ctx(d->ctx) < 0) {
        return -2;
    }
    do {
        ret = vfu_run_ctx(d->ctx);
    } while (ret >= 0);
    return -1;
}

void
device_destroy(struct test_device *d)
{
    vfu_destroy_ctx(d->ctx);
    d->ctx = NULL;
    free(d->bar2);
    d->bar2 = NULL;
}

pid_t
device_test_start(const char *name, char *path, size_t len,
                  struct device_server_args *args, void (*server)(void *))
{
    pid_t pid;

    t_init(name);
    t_socket_path(path, len, name);
    args->path = path;
    args->memfd = device_make_memfd();
    if (args->memfd < 0) {
        t_fail("memfd", "%s", strerror(errno));
        return -1;
    }
    pid = t_fork(server, args);
    if (pid < 0) {
        t_fail("fork", "%s", strerror(errno));
        return -1;
    }
    return pid;
}

void
device_serve_one_client(void *arg)
{
    struct device_server_args *a = arg;
    static struct test_device dev;
    int ret, err;

    if (device_setup(&dev, a->path, a->memfd) < 0) {
        return;
    }
    ret = device_serve_one(&dev);
    err = errno;
    t_check("server-run-ends-enotconn", ret == -1 && err == ENOTCONN,
            "ret %d errno %d (%s)", ret, err, strerror(err));
    device_destroy(&dev);
}
