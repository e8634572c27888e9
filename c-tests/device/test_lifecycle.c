/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * Context lifecycle: vfu_create_ctx() argument checking, the socket file,
 * vfu_get_private(), logging, realize, non-blocking attach and run, the
 * poll fd, and what vfu_destroy_ctx() leaves behind.
 *
 * Here the library runs in the parent and a forked child is the client.
 */

#define _GNU_SOURCE

#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <fcntl.h>
#include <unistd.h>

#include "client.h"
#include "device.h"

/* ---- logging ---- */

#define MAX_LOGS 16

static int nr_logs;
static int log_levels[MAX_LOGS];
static char log_msgs[MAX_LOGS][128];
static size_t log_lens[MAX_LOGS];
static vfu_ctx_t *log_ctx_seen;

static void
log_cb(vfu_ctx_t *ctx, int level, const char *msg)
{
    if (nr_logs < MAX_LOGS) {
        log_levels[nr_logs] = level;
        snprintf(log_msgs[nr_logs], sizeof(log_msgs[nr_logs]), "%s", msg);
        log_lens[nr_logs] = strlen(msg);
    }
    nr_logs++;
    log_ctx_seen = ctx;
    /* The library must hide whatever the callback does to errno. */
    errno = EBADF;
}

static void
check_logging(vfu_ctx_t *ctx)
{
    char big[2001];
    int err, ret;

    errno = 0;
    ret = vfu_setup_log(ctx, log_cb, LOG_DEBUG + 1);
    err = errno;
    t_check_err("setup-log-level-too-high", ret, err, EINVAL);
    errno = 0;
    ret = vfu_setup_log(ctx, log_cb, -1);
    err = errno;
    t_check_err("setup-log-level-negative", ret, err, EINVAL);

    t_check_u64("setup-log-warning", (uint64_t)vfu_setup_log(ctx, log_cb, LOG_WARNING), 0);

    nr_logs = 0;
    errno = EXDEV;
    vfu_log(ctx, LOG_INFO, "info %d", 1);
    err = errno;
    t_check("log-below-level-dropped", nr_logs == 0, "callback called %d times", nr_logs);
    t_check("log-dropped-keeps-errno", err == EXDEV, "errno %d, want EXDEV", err);

    nr_logs = 0;
    errno = EXDEV;
    vfu_log(ctx, LOG_ERR, "err %d %s %#x", 42, "x", 0xabc);
    err = errno;
    if (t_check("log-above-level-delivered", nr_logs == 1, "callback called %d times", nr_logs)) {
        t_check("log-level-passed", log_levels[0] == LOG_ERR, "level %d", log_levels[0]);
        t_check("log-message-formatted", strcmp(log_msgs[0], "err 42 x 0xabc") == 0,
                "message \"%s\"", log_msgs[0]);
        t_check("log-ctx-passed", log_ctx_seen == ctx, "ctx %p, want %p",
                (void *)log_ctx_seen, (void *)ctx);
    }
    t_check("log-delivered-keeps-errno", err == EXDEV, "errno %d (%s), want EXDEV",
            err, strerror(err));

    nr_logs = 0;
    vfu_log(ctx, LOG_WARNING, "edge");
    t_check("log-at-level-delivered", nr_logs == 1 && log_levels[0] == LOG_WARNING,
            "callback called %d times", nr_logs);

    nr_logs = 0;
    errno = ENOENT;
    vfu_log(ctx, LOG_ERR, "m=%m");
    err = errno;
    t_check("log-percent-m", nr_logs == 1 &&
            strcmp(log_msgs[0], "m=No such file or directory") == 0,
            "%d calls, message \"%s\"", nr_logs, nr_logs > 0 ? log_msgs[0] : "");
    t_check("log-percent-m-keeps-errno", err == ENOENT, "errno %d", err);

    memset(big, 'q', sizeof(big) - 1);
    big[sizeof(big) - 1] = '\0';
    nr_logs = 0;
    vfu_log(ctx, LOG_ERR, "%s", big);
    t_check("log-long-message", nr_logs == 1 && log_lens[0] == 2000,
            "%d calls, length %zu", nr_logs, nr_logs > 0 ? log_lens[0] : 0);

    t_check_u64("setup-log-debug", (uint64_t)vfu_setup_log(ctx, log_cb, LOG_DEBUG), 0);
    nr_logs = 0;
    vfu_log(ctx, LOG_DEBUG, "debug");
    t_check("log-debug-delivered", nr_logs == 1 && strcmp(log_msgs[0], "debug") == 0,
            "%d calls", nr_logs);

    t_check_u64("setup-log-null", (uint64_t)vfu_setup_log(ctx, NULL, LOG_DEBUG), 0);
    nr_logs = 0;
    vfu_log(ctx, LOG_ERR, "nobody listens");
    t_check("log-null-callback", nr_logs == 0, "old callback called %d times", nr_logs);

    /* From here on, library messages go to stderr if VFU_TEST_LOG is set. */
    vfu_setup_log(ctx, device_log, LOG_DEBUG);
}

/* ---- the client child ---- */

struct client_args {
    const char *path;
    int to_server;   /* client -> server pipe (write end) */
    int from_server; /* server -> client pipe (read end) */
};

static void
say(int fd, char c)
{
    if (write(fd, &c, 1) != 1) {
        t_fail("pipe-write", "%s", strerror(errno));
    }
}

static bool
expect(int fd, char c)
{
    char got = 0;
    struct pollfd pfd = { .fd = fd, .events = POLLIN };

    if (poll(&pfd, 1, CLIENT_TIMEOUT_MS) != 1 || read(fd, &got, 1) != 1) {
        return false;
    }
    return got == c;
}

static void
client_main(void *arg)
{
    struct client_args *a = arg;
    struct vfio_user_device_info in = { .argsz = sizeof(in) };
    struct vfio_user_version v = { .major = 0, .minor = 2 };
    struct reply r;
    int sock;

    sock = client_connect(a->path, CLIENT_TIMEOUT_MS);
    if (sock < 0) {
        t_fail("client-connect", "%s", strerror(errno));
        return;
    }
    /* The version request is queued before the server attaches. */
    if (client_send(sock, 1, VFIO_USER_VERSION, 0, &v, sizeof(v), NULL, 0) < 0) {
        t_fail("client-send-version", "%s", strerror(errno));
    }
    say(a->to_server, 'v');
    if (client_recv(sock, &r, CLIENT_TIMEOUT_MS) < 0) {
        t_fail("client-version-reply", "%s", strerror(errno));
        close(sock);
        return;
    }
    t_check("client-version-reply", reply_is_ok(&r) && r.hdr.msg_id == 1,
            "flags %#x error %u msg_id %#x", r.hdr.flags, r.hdr.error_no, r.hdr.msg_id);
    reply_free(&r);

    if (!expect(a->from_server, 'g')) {
        t_fail("client-sync-g", "server did not say go");
    }
    if (client_send(sock, 2, VFIO_USER_DEVICE_GET_INFO, 0, &in, sizeof(in), NULL, 0) < 0) {
        t_fail("client-send-get-info", "%s", strerror(errno));
    }
    say(a->to_server, 'i');
    if (client_recv(sock, &r, CLIENT_TIMEOUT_MS) < 0) {
        t_fail("client-get-info-reply", "%s", strerror(errno));
    } else {
        const struct vfio_user_device_info *out = (const void *)r.body;
        t_check("client-get-info-reply", reply_is_ok(&r) && r.len == sizeof(*out) &&
                out->num_regions == VFU_PCI_DEV_NUM_REGIONS,
                "flags %#x len %zu", r.hdr.flags, r.len);
        reply_free(&r);
    }
    if (!expect(a->from_server, 'q')) {
        t_fail("client-sync-q", "server did not say quit");
    }
    close(sock);
    say(a->to_server, 'c');
}

/* ---- the server side, in this process ---- */

static int
accept_conn(int fd)
{
    int v = -1;
    socklen_t len = sizeof(v);

    if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &v, &len) < 0) {
        return -1;
    }
    return v;
}

int
main(void)
{
    char path[108], dir_path[108], long_path[300];
    struct client_args args;
    int c2s[2], s2c[2];
    int marker = 0;
    vfu_ctx_t *ctx, *ctx2;
    struct stat st;
    int err, ret, listen_fd, conn_fd;
    pid_t pid;

    t_init("lifecycle");
    t_socket_path(path, sizeof(path), "lifecycle");

    errno = 0;
    ctx = vfu_create_ctx(VFU_TRANS_SOCK, path, 2, NULL, VFU_DEV_TYPE_PCI);
    err = errno;
    t_check("create-bad-flags", ctx == NULL && err == EINVAL, "ctx %p errno %d",
            (void *)ctx, err);
    t_check("create-bad-flags-no-socket", stat(path, &st) == -1 && errno == ENOENT,
            "socket file exists");

    errno = 0;
    ctx = vfu_create_ctx(VFU_TRANS_MAX, path, 0, NULL, VFU_DEV_TYPE_PCI);
    err = errno;
    t_check("create-bad-trans", ctx == NULL && err == ENOTSUP, "ctx %p errno %d",
            (void *)ctx, err);

    errno = 0;
    ctx = vfu_create_ctx(VFU_TRANS_PIPE, path, 0, NULL, VFU_DEV_TYPE_PCI);
    err = errno;
    t_check("create-pipe-trans", ctx == NULL && err == ENOTSUP, "ctx %p errno %d",
            (void *)ctx, err);

    errno = 0;
    ctx = vfu_create_ctx(VFU_TRANS_SOCK, path, 0, NULL, (vfu_dev_type_t)1);
    err = errno;
    t_check("create-bad-dev-type", ctx == NULL && err == ENOTSUP, "ctx %p errno %d",
            (void *)ctx, err);

    memset(long_path, 'a', sizeof(long_path) - 1);
    memcpy(long_path, "/tmp/", 5);
    long_path[sizeof(long_path) - 1] = '\0';
    errno = 0;
    ctx = vfu_create_ctx(VFU_TRANS_SOCK, long_path, 0, NULL, VFU_DEV_TYPE_PCI);
    err = errno;
    t_check("create-path-too-long", ctx == NULL && err == ENAMETOOLONG,
            "ctx %p errno %d", (void *)ctx, err);

    snprintf(dir_path, sizeof(dir_path), "/tmp/vfu-ctest-nodir-%ld/s.sock", (long)getpid());
    errno = 0;
    ctx = vfu_create_ctx(VFU_TRANS_SOCK, dir_path, 0, NULL, VFU_DEV_TYPE_PCI);
    err = errno;
    t_check("create-missing-dir", ctx == NULL && err == ENOENT, "ctx %p errno %d",
            (void *)ctx, err);

    ctx = vfu_create_ctx(VFU_TRANS_SOCK, path, LIBVFIO_USER_FLAG_ATTACH_NB, &marker,
                         VFU_DEV_TYPE_PCI);
    if (!t_check("create", ctx != NULL, "errno %d (%s)", errno, strerror(errno))) {
        return t_status();
    }
    t_check("create-socket-file", stat(path, &st) == 0 && S_ISSOCK(st.st_mode),
            "no socket at %s", path);
    t_check("get-private", vfu_get_private(ctx) == &marker, "got %p, want %p",
            vfu_get_private(ctx), (void *)&marker);

    errno = 0;
    ctx2 = vfu_create_ctx(VFU_TRANS_SOCK, path, 0, NULL, VFU_DEV_TYPE_PCI);
    err = errno;
    t_check("create-path-in-use", ctx2 == NULL && err == EADDRINUSE, "ctx %p errno %d",
            (void *)ctx2, err);
    if (ctx2 != NULL) {
        vfu_destroy_ctx(ctx2);
    }
    t_check("create-path-in-use-keeps-socket", stat(path, &st) == 0 && S_ISSOCK(st.st_mode),
            "the failed create removed the first context's socket");

    check_logging(ctx);

    t_check_u64("pci-init", (uint64_t)vfu_pci_init(ctx, VFU_PCI_TYPE_CONVENTIONAL,
                                                   PCI_HEADER_TYPE_NORMAL, 0), 0);
    t_check_u64("realize", (uint64_t)vfu_realize_ctx(ctx), 0);
    t_check_u64("realize-again", (uint64_t)vfu_realize_ctx(ctx), 0);

    listen_fd = vfu_get_poll_fd(ctx);
    t_check("poll-fd-listening", listen_fd >= 0 && accept_conn(listen_fd) == 1,
            "fd %d, SO_ACCEPTCONN %d", listen_fd, listen_fd >= 0 ? accept_conn(listen_fd) : -1);

    errno = 0;
    ret = vfu_run_ctx(ctx);
    err = errno;
    t_check_err("run-before-attach", ret, err, ENOTCONN);

    errno = 0;
    ret = vfu_attach_ctx(ctx);
    err = errno;
    t_check_err("attach-nb-no-client", ret, err, EAGAIN);

    if (pipe2(c2s, O_CLOEXEC) < 0 || pipe2(s2c, O_CLOEXEC) < 0) {
        t_fail("pipe", "%s", strerror(errno));
        return t_status();
    }
    args.path = path;
    args.to_server = c2s[1];
    args.from_server = s2c[0];
    pid = t_fork(client_main, &args);
    if (pid < 0) {
        t_fail("fork", "%s", strerror(errno));
        return t_status();
    }

    if (t_check("sync-version-sent", expect(c2s[0], 'v'), "client did not report")) {
        struct pollfd pfd = { .fd = listen_fd, .events = POLLIN };

        t_check("poll-fd-readable-on-connect", poll(&pfd, 1, CLIENT_TIMEOUT_MS) == 1 &&
                (pfd.revents & POLLIN), "revents %#x", pfd.revents);
    }
    errno = 0;
    ret = vfu_attach_ctx(ctx);
    err = errno;
    t_check("attach-nb-with-client", ret == 0, "ret %d errno %d (%s)", ret, err,
            strerror(err));

    conn_fd = vfu_get_poll_fd(ctx);
    t_check("poll-fd-connection", conn_fd >= 0 && conn_fd != listen_fd &&
            accept_conn(conn_fd) == 0, "fd %d (listen fd %d)", conn_fd, listen_fd);

    errno = 0;
    ret = vfu_run_ctx(ctx);
    err = errno;
    t_check("run-nb-idle", ret == 0, "ret %d errno %d (%s)", ret, err, strerror(err));

    say(s2c[1], 'g');
    t_check("sync-request-sent", expect(c2s[0], 'i'), "client did not report");
    errno = 0;
    ret = vfu_run_ctx(ctx);
    err = errno;
    t_check("run-nb-one-request", ret == 1, "ret %d errno %d (%s)", ret, err, strerror(err));

    say(s2c[1], 'q');
    t_check("sync-client-closed", expect(c2s[0], 'c'), "client did not report");
    errno = 0;
    ret = vfu_run_ctx(ctx);
    err = errno;
    t_check_err("run-nb-after-disconnect", ret, err, ENOTCONN);
    t_check("poll-fd-back-to-listen", vfu_get_poll_fd(ctx) == listen_fd &&
            fcntl(conn_fd, F_GETFD) == -1, "poll fd %d (listen %d), old connection fd %s",
            vfu_get_poll_fd(ctx), listen_fd,
            fcntl(conn_fd, F_GETFD) == -1 ? "closed" : "still open");

    t_wait_child("client-exit", pid, CLIENT_TIMEOUT_MS);

    vfu_destroy_ctx(ctx);
    t_check("destroy-removes-socket", stat(path, &st) == -1 && errno == ENOENT,
            "%s still exists", path);
    t_check("destroy-closes-listen-fd", fcntl(listen_fd, F_GETFD) == -1 && errno == EBADF,
            "fd %d still open", listen_fd);
    vfu_destroy_ctx(NULL);
    t_ok("destroy-null");

    close(c2s[0]);
    close(c2s[1]);
    close(s2c[0]);
    close(s2c[1]);
    (void) unlink(path);
    return t_status();
}
