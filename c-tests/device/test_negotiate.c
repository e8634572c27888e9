/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * VERSION negotiation: the reply's version and capabilities JSON, minor
 * version clamping, and the requests that must be refused with EINVAL
 * (after which the server drops the connection and accepts the next one).
 */

#define _GNU_SOURCE

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "client.h"
#include "device.h"

static const char *GOOD_JSON =
    "{\"capabilities\":{\"max_msg_fds\":8,\"max_data_xfer_size\":1048576}}";

/* What the server expects from each connection, in order. */
enum outcome { SERVED, REFUSED };

static const enum outcome expected[] = {
    SERVED,  /* 0.2 with JSON */
    SERVED,  /* 0.1 without JSON */
    SERVED,  /* 0.7 */
    REFUSED, /* major 1 */
    REFUSED, /* GET_INFO first */
    REFUSED, /* JSON without NUL */
    REFUSED, /* malformed JSON */
    REFUSED, /* max_msg_fds too large */
    REFUSED, /* max_msg_fds not a number */
    REFUSED, /* VERSION carrying an fd */
    REFUSED, /* body shorter than struct vfio_user_version */
    SERVED,  /* 0.2 again */
};
#define NR_CONNECTIONS (sizeof(expected) / sizeof(expected[0]))

static void
server_main(void *arg)
{
    struct device_server_args *a = arg;
    static struct test_device dev;
    size_t i;

    if (device_setup(&dev, a->path, a->memfd) < 0) {
        return;
    }
    for (i = 0; i < NR_CONNECTIONS; i++) {
        char name[64];
        int ret = device_serve_one(&dev);
        int err = errno;

        snprintf(name, sizeof(name), "server-connection-%zu", i);
        if (expected[i] == SERVED) {
            t_check(name, ret == -1 && err == ENOTCONN,
                    "want attach then ENOTCONN, got %d errno %d (%s)", ret, err,
                    strerror(err));
        } else {
            t_check(name, ret == -2, "want attach to fail, got %d errno %d (%s)",
                    ret, err, strerror(err));
        }
    }
    device_destroy(&dev);
}

/* After a refused negotiation the server must close the connection. */
static void
check_closed(const char *name, int sock)
{
    struct reply r;
    int ret = client_recv(sock, &r, CLIENT_TIMEOUT_MS);

    t_check(name, ret == -1 && errno == ECONNRESET, "connection still open (%s)",
            ret == 0 ? "got a message" : strerror(errno));
    if (ret == 0) {
        reply_free(&r);
    }
}

static void
check_refused(const char *name, int sock, struct reply *r, uint16_t msg_id)
{
    char sub[96];

    snprintf(sub, sizeof(sub), "%s-einval", name);
    t_check(sub, reply_is_error(r, EINVAL), "flags %#x error_no %u", r->hdr.flags,
            r->hdr.error_no);
    snprintf(sub, sizeof(sub), "%s-reply-header", name);
    t_check(sub, r->hdr.msg_id == msg_id && r->len == 0 &&
            r->hdr.flags == (VFIO_USER_F_TYPE_REPLY | VFIO_USER_F_ERROR),
            "msg_id %#x (want %#x), body %zu bytes, flags %#x", r->hdr.msg_id,
            msg_id, r->len, r->hdr.flags);
    snprintf(sub, sizeof(sub), "%s-closed", name);
    check_closed(sub, sock);
}

/* Sends a raw VERSION body and receives the reply. */
static int
raw_version(int sock, uint16_t msg_id, const void *body, size_t len,
            const int *fds, size_t nr_fds, struct reply *r)
{
    if (client_send(sock, msg_id, VFIO_USER_VERSION, 0, body, len, fds, nr_fds) < 0) {
        return -1;
    }
    return client_recv(sock, r, CLIENT_TIMEOUT_MS);
}

/* A VERSION body: major, minor and `json` bytes copied as given. */
static size_t
version_body(uint8_t *buf, uint16_t major, uint16_t minor, const char *json,
             size_t json_len)
{
    struct vfio_user_version v = { .major = major, .minor = minor };

    memcpy(buf, &v, sizeof(v));
    memcpy(buf + sizeof(v), json, json_len);
    return sizeof(v) + json_len;
}

static void
good_connection(const char *path, const char *name, uint16_t minor,
                const char *json, uint16_t want_minor, bool check_json)
{
    struct vfio_user_device_info info = { .argsz = sizeof(info) };
    const struct vfio_user_version *v;
    char sub[96];
    struct reply r;
    int sock;

    sock = client_connect(path, CLIENT_TIMEOUT_MS);
    if (sock < 0) {
        t_fail(name, "connect: %s", strerror(errno));
        return;
    }
    if (client_version(sock, 0, minor, json, &r) < 0) {
        t_fail(name, "no reply: %s", strerror(errno));
        close(sock);
        return;
    }
    snprintf(sub, sizeof(sub), "%s-reply-ok", name);
    t_check(sub, r.hdr.flags == VFIO_USER_F_TYPE_REPLY && r.hdr.error_no == 0 &&
            r.hdr.cmd == VFIO_USER_VERSION, "flags %#x error_no %u cmd %u",
            r.hdr.flags, r.hdr.error_no, r.hdr.cmd);
    if (r.len < sizeof(*v)) {
        t_fail(name, "reply body of %zu bytes", r.len);
        reply_free(&r);
        close(sock);
        return;
    }
    v = (const void *)r.body;
    snprintf(sub, sizeof(sub), "%s-major", name);
    t_check_u64(sub, v->major, 0);
    snprintf(sub, sizeof(sub), "%s-minor", name);
    t_check_u64(sub, v->minor, want_minor);
    snprintf(sub, sizeof(sub), "%s-no-fds", name);
    t_check_u64(sub, r.nr_fds, 0);

    if (check_json) {
        const char *json_out = (const char *)v->data;
        size_t jlen = r.len - sizeof(*v);
        uint64_t val = 0;

        snprintf(sub, sizeof(sub), "%s-json-nul-terminated", name);
        if (t_check(sub, jlen > 1 && json_out[jlen - 1] == '\0' &&
                    strlen(json_out) == jlen - 1, "%zu JSON bytes", jlen)) {
            snprintf(sub, sizeof(sub), "%s-json-capabilities", name);
            t_check(sub, strstr(json_out, "\"capabilities\"") != NULL &&
                    json_out[strspn(json_out, " \t\n")] == '{', "JSON: %s", json_out);
            snprintf(sub, sizeof(sub), "%s-json-max-msg-fds", name);
            t_check(sub, json_get_uint(json_out, "max_msg_fds", &val) && val == 8,
                    "JSON: %s", json_out);
            snprintf(sub, sizeof(sub), "%s-json-max-data-xfer-size", name);
            t_check(sub, json_get_uint(json_out, "max_data_xfer_size", &val) &&
                    val == 1048576, "JSON: %s", json_out);
            snprintf(sub, sizeof(sub), "%s-json-no-migration", name);
            t_check(sub, strstr(json_out, "\"migration\"") == NULL,
                    "migration advertised without migration callbacks: %s", json_out);
        }
    }
    reply_free(&r);

    /* The connection is usable afterwards. */
    snprintf(sub, sizeof(sub), "%s-then-get-info", name);
    if (client_call(sock, VFIO_USER_DEVICE_GET_INFO, &info, sizeof(info), NULL, 0, &r) < 0) {
        t_fail(sub, "no reply: %s", strerror(errno));
    } else {
        t_check(sub, reply_is_ok(&r), "flags %#x error_no %u", r.hdr.flags, r.hdr.error_no);
        reply_free(&r);
    }
    close(sock);
}

static void
bad_connection(const char *path, const char *name, const void *body, size_t len,
               uint16_t cmd, const int *fds, size_t nr_fds)
{
    uint16_t id = client_next_id();
    struct reply r;
    int sock;

    sock = client_connect(path, CLIENT_TIMEOUT_MS);
    if (sock < 0) {
        t_fail(name, "connect: %s", strerror(errno));
        return;
    }
    if (cmd == VFIO_USER_VERSION) {
        if (raw_version(sock, id, body, len, fds, nr_fds, &r) < 0) {
            t_fail(name, "no reply: %s", strerror(errno));
            close(sock);
            return;
        }
    } else {
        if (client_send(sock, id, cmd, 0, body, len, fds, nr_fds) < 0 ||
            client_recv(sock, &r, CLIENT_TIMEOUT_MS) < 0) {
            t_fail(name, "no reply: %s", strerror(errno));
            close(sock);
            return;
        }
    }
    check_refused(name, sock, &r, id);
    reply_free(&r);
    close(sock);
}

int
main(void)
{
    struct vfio_user_device_info info = { .argsz = sizeof(info) };
    struct device_server_args args;
    uint8_t body[256];
    char path[108];
    size_t len;
    pid_t pid;
    int fd;

    pid = device_test_start("negotiate", path, sizeof(path), &args, server_main);
    if (pid < 0) {
        return t_status();
    }

    good_connection(path, "v0.2-json", 2, GOOD_JSON, 2, true);
    good_connection(path, "v0.1-no-json", 1, NULL, 1, true);
    good_connection(path, "v0.7-minor-clamped", 7, "{}", 2, false);

    len = version_body(body, 1, 0, "{}", 3);
    bad_connection(path, "bad-major", body, len, VFIO_USER_VERSION, NULL, 0);

    bad_connection(path, "get-info-first", &info, sizeof(info),
                   VFIO_USER_DEVICE_GET_INFO, NULL, 0);

    len = version_body(body, 0, 2, "{}", 2);
    bad_connection(path, "json-not-nul-terminated", body, len, VFIO_USER_VERSION,
                   NULL, 0);

    len = version_body(body, 0, 2, "{\"capabilities\":", 17);
    bad_connection(path, "json-malformed", body, len, VFIO_USER_VERSION, NULL, 0);

    {
        const char *j = "{\"capabilities\":{\"max_msg_fds\":2000}}";
        len = version_body(body, 0, 2, j, strlen(j) + 1);
        bad_connection(path, "max-msg-fds-too-large", body, len, VFIO_USER_VERSION,
                       NULL, 0);
    }
    {
        const char *j = "{\"capabilities\":{\"max_msg_fds\":\"8\"}}";
        len = version_body(body, 0, 2, j, strlen(j) + 1);
        bad_connection(path, "max-msg-fds-string", body, len, VFIO_USER_VERSION,
                       NULL, 0);
    }

    fd = dup(args.memfd);
    len = version_body(body, 0, 2, "{}", 3);
    bad_connection(path, "version-with-fd", body, len, VFIO_USER_VERSION, &fd, 1);
    close(fd);

    bad_connection(path, "version-body-too-short", body, 2, VFIO_USER_VERSION, NULL, 0);

    good_connection(path, "v0.2-after-refusals", 2, GOOD_JSON, 2, false);

    t_wait_child("server-exit", pid, 20000);
    close(args.memfd);
    (void) unlink(path);
    return t_status();
}
