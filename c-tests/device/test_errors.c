/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * Malformed and unknown requests: each gets an EINVAL error reply carrying
 * the request's msg_id and cmd, and the server keeps serving the same
 * connection afterwards.
 */

#define _GNU_SOURCE

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "client.h"
#include "device.h"

static int sock;

/* The connection still works: a GET_INFO round trip. */
static void
check_alive(const char *name)
{
    struct vfio_user_device_info info = { .argsz = sizeof(info) };
    struct reply r;

    if (client_call(sock, VFIO_USER_DEVICE_GET_INFO, &info, sizeof(info), NULL, 0, &r) < 0) {
        t_fail(name, "no matching reply: %s", strerror(errno));
        return;
    }
    t_check(name, reply_is_ok(&r) && r.len == sizeof(info), "flags %#x error_no %u",
            r.hdr.flags, r.hdr.error_no);
    reply_free(&r);
}

/*
 * Sends `hdr` (as is) plus body and expects an EINVAL reply with the same
 * msg_id and cmd and an empty body; then checks the server still serves.
 */
static void
expect_einval(const char *name, struct vfio_user_header hdr, const void *body,
              size_t len)
{
    char sub[96];
    struct reply r;

    if (client_send_raw(sock, &hdr, body, len, NULL, 0) < 0 ||
        client_recv(sock, &r, CLIENT_TIMEOUT_MS) < 0) {
        t_fail(name, "no reply: %s", strerror(errno));
        return;
    }
    t_check(name, reply_is_error(&r, EINVAL), "flags %#x error_no %u", r.hdr.flags,
            r.hdr.error_no);
    snprintf(sub, sizeof(sub), "%s-reply-header", name);
    t_check(sub, r.hdr.msg_id == hdr.msg_id && r.hdr.cmd == hdr.cmd &&
            r.hdr.msg_size == sizeof(r.hdr) &&
            r.hdr.flags == (VFIO_USER_F_TYPE_REPLY | VFIO_USER_F_ERROR),
            "msg_id %#x cmd %u msg_size %u flags %#x (sent msg_id %#x cmd %u)",
            r.hdr.msg_id, r.hdr.cmd, r.hdr.msg_size, r.hdr.flags, hdr.msg_id, hdr.cmd);
    reply_free(&r);
    snprintf(sub, sizeof(sub), "%s-still-serving", name);
    check_alive(sub);
}

static struct vfio_user_header
header(uint16_t cmd, uint32_t msg_size, uint32_t flags)
{
    struct vfio_user_header h = {
        .msg_id = client_next_id(),
        .cmd = cmd,
        .msg_size = msg_size,
        .flags = flags,
    };
    return h;
}

int
main(void)
{
    struct vfio_user_device_info info = { .argsz = sizeof(info) };
    struct vfio_user_version v = { .major = 0, .minor = 2 };
    struct device_server_args args;
    uint32_t word = 0;
    char path[108];
    pid_t pid;

    pid = device_test_start("errors", path, sizeof(path), &args, device_serve_one_client);
    if (pid < 0) {
        return t_status();
    }

    sock = client_connect(path, CLIENT_TIMEOUT_MS);
    if (sock < 0 || client_negotiate(sock) < 0) {
        t_fail("connect", "%s", strerror(errno));
    } else {
        expect_einval("unknown-cmd-14", header(14, 20, 0), &word, 4);
        expect_einval("unknown-cmd-0", header(0, 20, 0), &word, 4);
        expect_einval("unknown-cmd-max", header(VFIO_USER_MAX, 20, 0), &word, 4);
        expect_einval("unknown-cmd-ffff", header(0xffff, 20, 0), &word, 4);
        expect_einval("version-after-negotiation", header(VFIO_USER_VERSION, 20, 0),
                      &v, sizeof(v));
        /* msg_size below the header size: only the header is sent. */
        expect_einval("msg-size-8", header(VFIO_USER_DEVICE_GET_INFO, 8, 0), NULL, 0);
        expect_einval("msg-size-0", header(VFIO_USER_DEVICE_GET_INFO, 0, 0), NULL, 0);
        expect_einval("msg-size-15", header(VFIO_USER_REGION_READ, 15, 0), NULL, 0);
        /* A command that needs a payload, sent without one. */
        expect_einval("get-info-no-payload", header(VFIO_USER_DEVICE_GET_INFO, 16, 0),
                      NULL, 0);
        /* Larger than any request may be; the body is never sent. */
        expect_einval("msg-size-huge", header(VFIO_USER_REGION_WRITE, 0x7fffffff, 0),
                      NULL, 0);
        /* A reply where a command is expected. */
        expect_einval("reply-type-message", header(VFIO_USER_DEVICE_GET_INFO, 32,
                                                   VFIO_USER_F_TYPE_REPLY),
                      &info, sizeof(info));

        /* A failing request with NO_REPLY produces nothing. */
        {
            struct vfio_user_header h = header(14, 20, VFIO_USER_F_NO_REPLY);
            int ret = client_send_raw(sock, &h, &word, 4, NULL, 0);
            t_check("no-reply-error-sent", ret == 0, "%s", strerror(errno));
            check_alive("no-reply-error-silent");
        }

        /* Pipelined requests are answered in order. */
        {
            uint16_t ids[3];
            struct reply r;
            int i, ret = 0;

            for (i = 0; i < 3; i++) {
                ids[i] = client_next_id();
                ret |= client_send(sock, ids[i], i == 1 ? 14 : VFIO_USER_DEVICE_GET_INFO,
                                   0, &info, sizeof(info), NULL, 0);
            }
            for (i = 0; i < 3 && ret == 0; i++) {
                char name[64];

                snprintf(name, sizeof(name), "pipelined-%d", i);
                if (client_recv(sock, &r, CLIENT_TIMEOUT_MS) < 0) {
                    t_fail(name, "no reply: %s", strerror(errno));
                    break;
                }
                t_check(name, r.hdr.msg_id == ids[i] &&
                        (i == 1 ? reply_is_error(&r, EINVAL) : reply_is_ok(&r)),
                        "msg_id %#x (want %#x) flags %#x error_no %u", r.hdr.msg_id,
                        ids[i], r.hdr.flags, r.hdr.error_no);
                reply_free(&r);
            }
            if (ret != 0) {
                t_fail("pipelined", "send failed");
            }
        }

        /* Half a header, then hang up: the server must see a disconnect. */
        {
            struct vfio_user_header h = header(VFIO_USER_DEVICE_GET_INFO, 32, 0);
            if (send(sock, &h, 8, MSG_NOSIGNAL) != 8) {
                t_fail("truncated-header", "%s", strerror(errno));
            }
        }
    }
    if (sock >= 0) {
        close(sock);
    }
    t_wait_child("server-exit", pid, 20000);
    close(args.memfd);
    (void) unlink(path);
    return t_status();
}
