/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * The device reset callback: DEVICE_RESET requests (successful, failing and
 * without reply), the reset on client disconnect, re-attaching afterwards,
 * and destroying a context while a client is attached.
 */

#define _GNU_SOURCE

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "client.h"
#include "device.h"

static const char *
reset_name(int type)
{
    switch (type) {
    case VFU_RESET_DEVICE: return "DEVICE";
    case VFU_RESET_LOST_CONN: return "LOST_CONN";
    case VFU_RESET_PCI_FLR: return "PCI_FLR";
    default: return "?";
    }
}

static void
check_resets(const char *name, const struct test_device *d, const int *want, size_t n)
{
    char got[256] = "";
    bool same = d->nr_resets == n;
    size_t i;

    for (i = 0; i < d->nr_resets && i < DEV_MAX_RESETS; i++) {
        size_t used = strlen(got);
        snprintf(got + used, sizeof(got) - used, "%s%s", i ? "," : "",
                 reset_name(d->resets[i]));
        if (i < n && d->resets[i] != want[i]) {
            same = false;
        }
    }
    t_check(name, same, "reset calls [%s], want %zu calls", got, n);
}

static void
server_main(void *arg)
{
    static const int first[] = {
        VFU_RESET_DEVICE, VFU_RESET_DEVICE, VFU_RESET_DEVICE, VFU_RESET_LOST_CONN,
    };
    static const int second[] = {
        VFU_RESET_DEVICE, VFU_RESET_DEVICE, VFU_RESET_DEVICE, VFU_RESET_LOST_CONN,
        VFU_RESET_LOST_CONN,
    };
    struct device_server_args *a = arg;
    static struct test_device dev;
    size_t before;
    int ret, err;

    if (device_setup(&dev, a->path, a->memfd) < 0) {
        return;
    }
    t_check("server-no-reset-at-setup", dev.nr_resets == 0, "%zu resets", dev.nr_resets);

    /* Connection 1: three DEVICE_RESET requests, then the client leaves. */
    ret = device_serve_one(&dev);
    err = errno;
    t_check("server-run-1-ends-enotconn", ret == -1 && err == ENOTCONN,
            "ret %d errno %d (%s)", ret, err, strerror(err));
    check_resets("server-resets-after-disconnect", &dev, first, 4);

    /* Connection 2: just connects and leaves. */
    ret = device_serve_one(&dev);
    err = errno;
    t_check("server-run-2-ends-enotconn", ret == -1 && err == ENOTCONN,
            "ret %d errno %d (%s)", ret, err, strerror(err));
    check_resets("server-resets-after-second-disconnect", &dev, second, 5);

    /* Connection 3: destroyed while attached. */
    ret = vfu_attach_ctx(dev.ctx);
    err = errno;
    t_check("server-attach-3", ret == 0, "ret %d errno %d (%s)", ret, err, strerror(err));
    before = dev.nr_resets;
    device_destroy(&dev);
    t_check("server-destroy-attached-resets-once", dev.nr_resets == before + 1 &&
            dev.resets[before] == VFU_RESET_LOST_CONN, "%zu new reset calls, last %s",
            dev.nr_resets - before, reset_name(dev.resets[dev.nr_resets - 1]));
    t_check("server-reset-callback-ctx", dev.reset_bad_ctx == 0,
            "%d calls with a wrong ctx", dev.reset_bad_ctx);
}

static uint32_t
read_resets(int sock, const char *name)
{
    uint32_t n = 0xffffffff;
    int ret = client_region_read(sock, VFU_PCI_DEV_BAR1_REGION_IDX, DEV_BAR1_RESETS_OFF,
                                 4, &n);

    if (ret != 0) {
        t_fail(name, "reading the reset counter failed: %d", ret);
    }
    return n;
}

static void
first_connection(const char *path)
{
    struct vfio_user_device_info info = { .argsz = sizeof(info) };
    uint32_t one = 1;
    uint16_t id;
    struct reply r;
    int sock, ret;

    sock = client_connect(path, CLIENT_TIMEOUT_MS);
    if (sock < 0 || client_negotiate(sock) < 0) {
        t_fail("connect-1", "%s", strerror(errno));
        if (sock >= 0) {
            close(sock);
        }
        return;
    }
    t_check_u64("no-reset-after-negotiation", read_resets(sock, "reset-count-0"), 0);

    if (client_call(sock, VFIO_USER_DEVICE_RESET, NULL, 0, NULL, 0, &r) < 0) {
        t_fail("reset", "no reply: %s", strerror(errno));
    } else {
        t_check("reset", reply_is_ok(&r) && r.len == 0 && r.hdr.msg_size == 16,
                "flags %#x error_no %u msg_size %u", r.hdr.flags, r.hdr.error_no,
                r.hdr.msg_size);
        reply_free(&r);
    }
    t_check_u64("reset-called-once", read_resets(sock, "reset-count-1"), 1);

    /* The callback fails: the client gets its errno. */
    ret = client_region_write(sock, VFU_PCI_DEV_BAR1_REGION_IDX, DEV_BAR1_RESETS_OFF, 4, &one);
    t_check("arm-failing-reset", ret == 0, "ret %d", ret);
    if (client_call(sock, VFIO_USER_DEVICE_RESET, NULL, 0, NULL, 0, &r) < 0) {
        t_fail("reset-callback-fails-eio", "no reply: %s", strerror(errno));
    } else {
        t_check("reset-callback-fails-eio", reply_is_error(&r, EIO),
                "flags %#x error_no %u", r.hdr.flags, r.hdr.error_no);
        reply_free(&r);
    }
    t_check_u64("reset-called-twice", read_resets(sock, "reset-count-2"), 2);

    /* NO_REPLY: the reset happens and nothing is sent back for it. */
    id = client_next_id();
    ret = client_send(sock, id, VFIO_USER_DEVICE_RESET, VFIO_USER_F_NO_REPLY, NULL, 0,
                      NULL, 0);
    t_check("reset-no-reply-sent", ret == 0, "%s", strerror(errno));
    if (client_call(sock, VFIO_USER_DEVICE_GET_INFO, &info, sizeof(info), NULL, 0, &r) < 0) {
        t_fail("reset-no-reply-silent", "no (matching) reply: %s", strerror(errno));
    } else {
        t_check("reset-no-reply-silent", reply_is_ok(&r), "flags %#x", r.hdr.flags);
        reply_free(&r);
    }
    t_check_u64("reset-called-three-times", read_resets(sock, "reset-count-3"), 3);
    close(sock);
}

static void
second_connection(const char *path)
{
    int sock = client_connect(path, CLIENT_TIMEOUT_MS);

    if (sock < 0 || client_negotiate(sock) < 0) {
        t_fail("connect-2", "%s", strerror(errno));
    } else {
        /* The first client's departure was reported as LOST_CONN. */
        t_check_u64("reset-on-disconnect-counted", read_resets(sock, "reset-count-4"), 4);
    }
    if (sock >= 0) {
        close(sock);
    }
}

static void
third_connection(const char *path)
{
    struct reply r;
    int sock = client_connect(path, CLIENT_TIMEOUT_MS);

    if (sock < 0 || client_negotiate(sock) < 0) {
        t_fail("connect-3", "%s", strerror(errno));
    } else {
        int ret = client_recv(sock, &r, CLIENT_TIMEOUT_MS);
        t_check("destroy-closes-connection", ret == -1 && errno == ECONNRESET,
                "%s", ret == 0 ? "got a message" : strerror(errno));
        if (ret == 0) {
            reply_free(&r);
        }
    }
    if (sock >= 0) {
        close(sock);
    }
}

int
main(void)
{
    struct device_server_args args;
    char path[108];
    pid_t pid;

    pid = device_test_start("reset", path, sizeof(path), &args, server_main);
    if (pid < 0) {
        return t_status();
    }
    first_connection(path);
    second_connection(path);
    third_connection(path);
    t_wait_child("server-exit", pid, 20000);
    close(args.memfd);
    (void) unlink(path);
    return t_status();
}
