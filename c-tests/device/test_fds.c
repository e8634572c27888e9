/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * File descriptor hygiene of the server: fds that arrive with requests that
 * do not use them (or that fail) are closed, eventfds kept for interrupts
 * are released when disabled and on disconnect, region fds handed out are
 * duplicates, and after the run the process has exactly the descriptors it
 * had before.
 */

#define _GNU_SOURCE

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "client.h"
#include "device.h"

static void
server_main(void *arg)
{
    struct device_server_args *a = arg;
    static struct test_device dev;
    int before_create, after_setup, n, ret, err;

    before_create = t_count_fds();
    if (device_setup(&dev, a->path, a->memfd) < 0) {
        return;
    }
    after_setup = t_count_fds();
    t_check("server-setup-opens-one-fd", after_setup == before_create + 1,
            "%d fds before vfu_create_ctx, %d after realize", before_create, after_setup);

    ret = device_serve_one(&dev);
    err = errno;
    t_check("server-run-ends-enotconn", ret == -1 && err == ENOTCONN,
            "ret %d errno %d (%s)", ret, err, strerror(err));
    n = t_count_fds();
    t_check("server-fds-after-disconnect", n == after_setup,
            "%d fds, %d before the client came", n, after_setup);

    device_destroy(&dev);
    n = t_count_fds();
    t_check("server-fds-after-destroy", n == before_create,
            "%d fds, %d before vfu_create_ctx", n, before_create);
    /* The memfd of BAR0 belongs to the device, not to the library. */
    t_check("server-memfd-still-open", fcntl(a->memfd, F_GETFD) != -1,
            "the library closed the region fd it was given");
}

static int sock;
static int efds[CLIENT_MAX_FDS];

static int
server_fds(const char *name)
{
    uint32_t n = 0;
    int ret = client_region_read(sock, VFU_PCI_DEV_BAR1_REGION_IDX, DEV_BAR1_FDCOUNT_OFF,
                                 4, &n);

    if (ret != 0) {
        t_fail(name, "reading the server's fd count failed: %d", ret);
        return -1;
    }
    return (int)n;
}

/* Sends hdr+body with nfds fds, expects a reply with `want` (0 = success). */
static void
send_with_fds(const char *name, uint16_t cmd, uint32_t msg_size, uint32_t flags,
              const void *body, size_t len, size_t nfds, int want)
{
    struct vfio_user_header h = {
        .msg_id = client_next_id(),
        .cmd = cmd,
        .msg_size = msg_size,
        .flags = flags,
    };
    struct reply r;

    if (client_send_raw(sock, &h, body, len, efds, nfds) < 0) {
        t_fail(name, "send: %s", strerror(errno));
        return;
    }
    if (flags & VFIO_USER_F_NO_REPLY) {
        t_ok(name);
        return;
    }
    if (client_recv(sock, &r, CLIENT_TIMEOUT_MS) < 0) {
        t_fail(name, "no reply: %s", strerror(errno));
        return;
    }
    if (want == 0) {
        t_check(name, reply_is_ok(&r) && r.hdr.msg_id == h.msg_id,
                "flags %#x error_no %u", r.hdr.flags, r.hdr.error_no);
    } else {
        t_check(name, reply_is_error(&r, want) && r.hdr.msg_id == h.msg_id,
                "flags %#x error_no %u, want errno %d", r.hdr.flags, r.hdr.error_no, want);
    }
    reply_free(&r);
}

static void
set_irqs(const char *name, uint32_t flags, uint32_t start, uint32_t count, size_t nfds,
         int want)
{
    struct vfio_irq_set s = {
        .argsz = sizeof(s),
        .flags = flags,
        .index = VFIO_PCI_MSIX_IRQ_INDEX,
        .start = start,
        .count = count,
    };

    send_with_fds(name, VFIO_USER_DEVICE_SET_IRQS, sizeof(struct vfio_user_header) + sizeof(s),
                  0, &s, sizeof(s), nfds, want);
}

static void
check_count(const char *name, int base, int extra)
{
    int n = server_fds(name);

    t_check(name, n == base + extra, "server has %d fds, want %d", n, base + extra);
}

int
main(void)
{
    struct vfio_user_device_info info = { .argsz = sizeof(info) };
    struct vfio_user_region_access oob = {
        .offset = DEV_BAR1_SIZE, .region = VFU_PCI_DEV_BAR1_REGION_IDX, .count = 4,
    };
    struct device_server_args args;
    uint8_t body[64] = { 0 };
    char path[108];
    int base, i, client_before;
    pid_t pid;

    t_init("fds");
    t_socket_path(path, sizeof(path), "fds");
    args.path = path;
    args.memfd = device_make_memfd();
    if (args.memfd < 0) {
        t_fail("memfd", "%s", strerror(errno));
        return t_status();
    }
    for (i = 0; i < CLIENT_MAX_FDS; i++) {
        efds[i] = eventfd(0, EFD_CLOEXEC);
        if (efds[i] < 0) {
            t_fail("eventfd", "%s", strerror(errno));
            return t_status();
        }
    }
    pid = t_fork(server_main, &args);
    if (pid < 0) {
        t_fail("fork", "%s", strerror(errno));
        return t_status();
    }

    client_before = t_count_fds();
    sock = client_connect(path, CLIENT_TIMEOUT_MS);
    if (sock < 0 || client_negotiate(sock) < 0) {
        t_fail("connect", "%s", strerror(errno));
        goto out;
    }
    base = server_fds("baseline");
    if (base < 0) {
        goto out;
    }

    /* Requests that do not take fds, failing or not. */
    send_with_fds("unknown-cmd-with-3-fds", 14, 20, 0, body, 4, 3, EINVAL);
    check_count("unknown-cmd-fds-closed", base, 0);
    send_with_fds("unknown-cmd-with-16-fds", 14, 20, 0, body, 4, 16, EINVAL);
    check_count("unknown-cmd-16-fds-closed", base, 0);
    send_with_fds("short-msg-size-with-fds", VFIO_USER_DEVICE_GET_INFO, 8, 0, NULL, 0, 2,
                  EINVAL);
    check_count("short-msg-size-fds-closed", base, 0);
    send_with_fds("get-info-with-fds", VFIO_USER_DEVICE_GET_INFO, 16 + sizeof(info), 0,
                  &info, sizeof(info), 2, 0);
    check_count("get-info-fds-closed", base, 0);
    send_with_fds("oob-read-with-fds", VFIO_USER_REGION_READ, 16 + sizeof(oob), 0, &oob,
                  sizeof(oob), 4, EINVAL);
    check_count("oob-read-fds-closed", base, 0);
    send_with_fds("no-reply-error-with-fds", 14, 20, VFIO_USER_F_NO_REPLY, body, 4, 3, 0);
    check_count("no-reply-error-fds-closed", base, 0);
    send_with_fds("reset-with-fds", VFIO_USER_DEVICE_RESET, 16, 0, NULL, 0, 1, 0);
    check_count("reset-fds-closed", base, 0);

    /* A region fd handed to the client is a copy: nothing stays behind. */
    {
        struct vfio_region_info ri = { .argsz = 80, .index = VFU_PCI_DEV_BAR0_REGION_IDX };
        struct reply r;

        if (client_call(sock, VFIO_USER_DEVICE_GET_REGION_INFO, &ri, sizeof(ri), NULL, 0,
                        &r) == 0) {
            t_check("region-info-fd", reply_is_ok(&r) && r.nr_fds == 1, "flags %#x fds %zu",
                    r.hdr.flags, r.nr_fds);
            reply_free(&r);
        } else {
            t_fail("region-info-fd", "no reply: %s", strerror(errno));
        }
        check_count("region-info-no-server-fd-left", base, 0);
    }

    /* Interrupt eventfds are kept, then released. */
    set_irqs("set-irqs-fd-count-mismatch", VFIO_IRQ_SET_DATA_EVENTFD |
             VFIO_IRQ_SET_ACTION_TRIGGER, 0, 2, 3, EINVAL);
    check_count("set-irqs-mismatch-fds-closed", base, 0);
    set_irqs("set-irqs-out-of-range", VFIO_IRQ_SET_DATA_EVENTFD |
             VFIO_IRQ_SET_ACTION_TRIGGER, 3, 2, 2, EINVAL);
    check_count("set-irqs-out-of-range-fds-closed", base, 0);
    set_irqs("set-irqs-2-eventfds", VFIO_IRQ_SET_DATA_EVENTFD |
             VFIO_IRQ_SET_ACTION_TRIGGER, 0, 2, 2, 0);
    check_count("set-irqs-eventfds-kept", base, 2);
    set_irqs("set-irqs-disable", VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
             0, 0, 0, 0);
    check_count("set-irqs-disable-releases", base, 0);
    set_irqs("set-irqs-2-eventfds-again", VFIO_IRQ_SET_DATA_EVENTFD |
             VFIO_IRQ_SET_ACTION_TRIGGER, 0, 2, 2, 0);
    check_count("set-irqs-eventfds-kept-again", base, 2);
    /* Replacing them closes the old ones. */
    set_irqs("set-irqs-replace", VFIO_IRQ_SET_DATA_EVENTFD |
             VFIO_IRQ_SET_ACTION_TRIGGER, 0, 2, 2, 0);
    check_count("set-irqs-replace-closes-old", base, 2);
    /* ...and they are left set: the disconnect must release them. */

out:
    if (sock >= 0) {
        close(sock);
    }
    t_wait_child("server-exit", pid, 20000);
    t_check("client-fds-unchanged", t_count_fds() == client_before,
            "%d fds, %d before connecting", t_count_fds(), client_before);
    for (i = 0; i < CLIENT_MAX_FDS; i++) {
        close(efds[i]);
    }
    close(args.memfd);
    (void) unlink(path);
    return t_status();
}
