/* SPDX-License-Identifier: BSD-3-Clause */
/* Reporting, process plumbing and the raw vfio-user client of the tests. */

#include "client.h"

#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* Largest message the client accepts from the server. */
#define CLIENT_MAX_MSG (64u * 1024 * 1024)

/* Seconds after which a test process kills itself (SIGALRM). */
#define WATCHDOG_SECONDS 50

int t_failures;

static const char *t_program = "test";

void
t_init(const char *program)
{
    t_program = program;
    setvbuf(stdout, NULL, _IOLBF, 0);
    alarm(WATCHDOG_SECONDS);
}

void
t_ok(const char *name)
{
    printf("ok %s/%s\n", t_program, name);
}

static void
vfail(const char *name, const char *fmt, va_list ap)
{
    char why[512];

    vsnprintf(why, sizeof(why), fmt, ap);
    printf("FAIL %s/%s: %s\n", t_program, name, why);
    t_failures++;
}

void
t_fail(const char *name, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    vfail(name, fmt, ap);
    va_end(ap);
}

bool
t_check(const char *name, bool cond, const char *fmt, ...)
{
    va_list ap;

    if (cond) {
        t_ok(name);
        return true;
    }
    va_start(ap, fmt);
    vfail(name, fmt, ap);
    va_end(ap);
    return false;
}

bool
t_check_u64(const char *name, uint64_t got, uint64_t want)
{
    return t_check(name, got == want, "got %#" PRIx64 ", want %#" PRIx64,
                   got, want);
}

bool
t_check_err(const char *name, long ret, int err, int want_errno)
{
    if (ret != -1) {
        t_fail(name, "returned %ld, want -1 with errno %d (%s)", ret,
               want_errno, strerror(want_errno));
        return false;
    }
    return t_check(name, err == want_errno, "errno %d (%s), want %d (%s)",
                   err, strerror(err), want_errno, strerror(want_errno));
}

int
t_status(void)
{
    return t_failures == 0 ? 0 : 1;
}

void
t_socket_path(char *buf, size_t len, const char *tag)
{
    snprintf(buf, len, "/tmp/vfu-ctest-%s-%ld.sock", tag, (long)getpid());
    (void) unlink(buf);
}

pid_t
t_fork(void (*fn)(void *arg), void *arg)
{
    pid_t pid;

    fflush(stdout);
    fflush(stderr);
    pid = fork();
    if (pid == 0) {
        /* The child runs on its own: its failures are its own. */
        t_failures = 0;
        alarm(WATCHDOG_SECONDS);
        fn(arg);
        exit(t_status());
    }
    return pid;
}

static void
sleep_ms(int ms)
{
    struct timespec ts = { .tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000L };

    while (nanosleep(&ts, &ts) == -1 && errno == EINTR) {
        continue;
    }
}

bool
t_wait_child(const char *name, pid_t pid, int timeout_ms)
{
    int status = 0;
    int waited = 0;
    pid_t r;

    for (;;) {
        r = waitpid(pid, &status, WNOHANG);
        if (r == pid) {
            break;
        }
        if (r == -1 && errno != EINTR) {
            t_fail(name, "waitpid: %s", strerror(errno));
            return false;
        }
        if (waited >= timeout_ms) {
            kill(pid, SIGKILL);
            (void) waitpid(pid, &status, 0);
            t_fail(name, "server did not exit within %d ms (killed)", timeout_ms);
            return false;
        }
        sleep_ms(10);
        waited += 10;
    }

    if (WIFEXITED(status)) {
        return t_check(name, WEXITSTATUS(status) == 0,
                       "server exited with status %d", WEXITSTATUS(status));
    }
    if (WIFSIGNALED(status)) {
        t_fail(name, "server killed by signal %d", WTERMSIG(status));
        return false;
    }
    t_fail(name, "server ended with wait status %#x", status);
    return false;
}

int
t_count_fds(void)
{
    DIR *dir = opendir("/proc/self/fd");
    struct dirent *de;
    int n = 0;

    if (dir == NULL) {
        return -1;
    }
    while ((de = readdir(dir)) != NULL) {
        if (de->d_name[0] != '.') {
            n++;
        }
    }
    closedir(dir);
    /* The directory stream's own descriptor was listed too. */
    return n - 1;
}

/* ------------------------------------------------------------------------ */

static uint16_t next_msg_id = 0x100;

uint16_t
client_next_id(void)
{
    return next_msg_id++;
}

int
client_connect(const char *path, int timeout_ms)
{
    struct sockaddr_un addr = { .sun_family = AF_UNIX };
    int waited = 0;
    int sock;

    if (strlen(path) >= sizeof(addr.sun_path)) {
        errno = ENAMETOOLONG;
        return -1;
    }
    strcpy(addr.sun_path, path);

    for (;;) {
        sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (sock == -1) {
            return -1;
        }
        if (connect(sock, (struct sockaddr *)&addr, sizeof(addr)) == 0) {
            return sock;
        }
        int err = errno;
        close(sock);
        if ((err != ENOENT && err != ECONNREFUSED) || waited >= timeout_ms) {
            errno = err;
            return -1;
        }
        sleep_ms(5);
        waited += 5;
    }
}

/* Sends all of iov[0..n) with `fds` attached to the first byte. */
static int
send_all(int sock, struct iovec *iov, int n, const int *fds, size_t nr_fds)
{
    union {
        char buf[CMSG_SPACE(sizeof(int) * CLIENT_MAX_FDS)];
        struct cmsghdr align;
    } control;
    struct msghdr msg = { 0 };
    ssize_t sent;

    if (nr_fds > CLIENT_MAX_FDS) {
        errno = E2BIG;
        return -1;
    }

    msg.msg_iov = iov;
    msg.msg_iovlen = n;
    if (nr_fds > 0) {
        struct cmsghdr *cmsg;

        memset(&control, 0, sizeof(control));
        msg.msg_control = control.buf;
        msg.msg_controllen = CMSG_SPACE(sizeof(int) * nr_fds);
        cmsg = CMSG_FIRSTHDR(&msg);
        cmsg->cmsg_level = SOL_SOCKET;
        cmsg->cmsg_type = SCM_RIGHTS;
        cmsg->cmsg_len = CMSG_LEN(sizeof(int) * nr_fds);
        memcpy(CMSG_DATA(cmsg), fds, sizeof(int) * nr_fds);
    }

    while (msg.msg_iovlen > 0) {
        sent = sendmsg(sock, &msg, MSG_NOSIGNAL);
        if (sent == -1) {
            if (errno == EINTR) {
                continue;
            }
            return -1;
        }
        /* Only the first chunk carries the fds. */
        msg.msg_control = NULL;
        msg.msg_controllen = 0;
        while (msg.msg_iovlen > 0 && (size_t)sent >= msg.msg_iov->iov_len) {
            sent -= msg.msg_iov->iov_len;
            msg.msg_iov++;
            msg.msg_iovlen--;
        }
        if (msg.msg_iovlen > 0) {
            msg.msg_iov->iov_base = (char *)msg.msg_iov->iov_base + sent;
            msg.msg_iov->iov_len -= sent;
        }
    }
    return 0;
}

int
client_send_raw(int sock, const struct vfio_user_header *hdr,
                const void *body, size_t len, const int *fds, size_t nr_fds)
{
    struct vfio_user_header h = *hdr;
    struct iovec iov[2] = {
        { .iov_base = &h, .iov_len = sizeof(h) },
        { .iov_base = (void *)body, .iov_len = len },
    };

    return send_all(sock, iov, len > 0 ? 2 : 1, fds, nr_fds);
}

int
client_send(int sock, uint16_t msg_id, uint16_t cmd, uint32_t flags,
            const void *body, size_t len, const int *fds, size_t nr_fds)
{
    struct vfio_user_header hdr = {
        .msg_id = msg_id,
        .cmd = cmd,
        .msg_size = (uint32_t)(sizeof(hdr) + len),
        .flags = flags,
    };

    return client_send_raw(sock, &hdr, body, len, fds, nr_fds);
}

/* Waits until sock is readable; -1/ETIMEDOUT if it does not become so. */
static int
wait_readable(int sock, int timeout_ms)
{
    struct pollfd pfd = { .fd = sock, .events = POLLIN };
    int r;

    do {
        r = poll(&pfd, 1, timeout_ms);
    } while (r == -1 && errno == EINTR);
    if (r == 0) {
        errno = ETIMEDOUT;
        return -1;
    }
    return r < 0 ? -1 : 0;
}

/* Receives exactly len bytes, appending any fds that come along to r. */
static int
recv_exact(int sock, void *buf, size_t len, struct reply *r, int timeout_ms)
{
    size_t got = 0;

    while (got < len) {
        union {
            char buf[CMSG_SPACE(sizeof(int) * CLIENT_MAX_FDS)];
            struct cmsghdr align;
        } control;
        struct iovec iov = { .iov_base = (char *)buf + got, .iov_len = len - got };
        struct msghdr msg = {
            .msg_iov = &iov,
            .msg_iovlen = 1,
            .msg_control = control.buf,
            .msg_controllen = sizeof(control.buf),
        };
        struct cmsghdr *cmsg;
        ssize_t n;

        if (wait_readable(sock, timeout_ms) < 0) {
            return -1;
        }
        n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
        if (n == -1) {
            if (errno == EINTR) {
                continue;
            }
            return -1;
        }
        if (n == 0) {
            errno = ECONNRESET;
            return -1;
        }
        for (cmsg = CMSG_FIRSTHDR(&msg); cmsg != NULL;
             cmsg = CMSG_NXTHDR(&msg, cmsg)) {
            size_t i, nfd;

            if (cmsg->cmsg_level != SOL_SOCKET || cmsg->cmsg_type != SCM_RIGHTS) {
                continue;
            }
            nfd = (cmsg->cmsg_len - CMSG_LEN(0)) / sizeof(int);
            for (i = 0; i < nfd; i++) {
                int fd;

                memcpy(&fd, CMSG_DATA(cmsg) + i * sizeof(int), sizeof(int));
                if (r->nr_fds < CLIENT_MAX_FDS) {
                    r->fds[r->nr_fds++] = fd;
                } else {
                    close(fd);
                }
            }
        }
        got += (size_t)n;
    }
    return 0;
}

int
client_recv(int sock, struct reply *r, int timeout_ms)
{
    memset(r, 0, sizeof(*r));

    if (recv_exact(sock, &r->hdr, sizeof(r->hdr), r, timeout_ms) < 0) {
        int err = errno;
        reply_free(r);
        errno = err;
        return -1;
    }
    if (r->hdr.msg_size < sizeof(r->hdr) || r->hdr.msg_size > CLIENT_MAX_MSG) {
        reply_free(r);
        errno = EPROTO;
        return -1;
    }
    r->len = r->hdr.msg_size - sizeof(r->hdr);
    if (r->len > 0) {
        r->body = calloc(1, r->len);
        if (r->body == NULL) {
            reply_free(r);
            errno = ENOMEM;
            return -1;
        }
        if (recv_exact(sock, r->body, r->len, r, timeout_ms) < 0) {
            int err = errno;
            reply_free(r);
            errno = err;
            return -1;
        }
    }
    return 0;
}

void
reply_free(struct reply *r)
{
    size_t i;

    free(r->body);
    r->body = NULL;
    r->len = 0;
    for (i = 0; i < r->nr_fds; i++) {
        close(r->fds[i]);
    }
    r->nr_fds = 0;
}

int
client_call(int sock, uint16_t cmd, const void *body, size_t len,
            const int *fds, size_t nr_fds, struct reply *r)
{
    uint16_t id = client_next_id();

    memset(r, 0, sizeof(*r));
    if (client_send(sock, id, cmd, VFIO_USER_F_TYPE_COMMAND, body, len,
                    fds, nr_fds) < 0) {
        return -1;
    }
    if (client_recv(sock, r, CLIENT_TIMEOUT_MS) < 0) {
        return -1;
    }
    if (r->hdr.msg_id != id || r->hdr.cmd != cmd) {
        fprintf(stderr, "reply msg_id %#x cmd %u, sent msg_id %#x cmd %u\n",
                r->hdr.msg_id, r->hdr.cmd, id, cmd);
        reply_free(r);
        errno = EPROTO;
        return -1;
    }
    return 0;
}

int
client_version(int sock, uint16_t major, uint16_t minor, const char *json,
               struct reply *r)
{
    size_t jlen = json != NULL ? strlen(json) + 1 : 0;
    size_t len = sizeof(struct vfio_user_version) + jlen;
    struct vfio_user_version *v = calloc(1, len);
    int ret;

    if (v == NULL) {
        return -1;
    }
    v->major = major;
    v->minor = minor;
    if (jlen > 0) {
        memcpy(v->data, json, jlen);
    }
    ret = client_call(sock, VFIO_USER_VERSION, v, len, NULL, 0, r);
    free(v);
    return ret;
}

int
client_negotiate(int sock)
{
    struct reply r;
    int ret = -1;

    if (client_version(sock, 0, 2,
                       "{\"capabilities\":{\"max_msg_fds\":8,"
                       "\"max_data_xfer_size\":1048576}}", &r) < 0) {
        return -1;
    }
    if (reply_is_ok(&r) && r.len >= sizeof(struct vfio_user_version)) {
        ret = 0;
    }
    reply_free(&r);
    return ret;
}

bool
reply_is_error(const struct reply *r, int err)
{
    return (r->hdr.flags & VFIO_USER_F_TYPE_MASK) == VFIO_USER_F_TYPE_REPLY &&
           (r->hdr.flags & VFIO_USER_F_ERROR) != 0 &&
           r->hdr.error_no == (uint32_t)err;
}

bool
reply_is_ok(const struct reply *r)
{
    return (r->hdr.flags & VFIO_USER_F_TYPE_MASK) == VFIO_USER_F_TYPE_REPLY &&
           (r->hdr.flags & VFIO_USER_F_ERROR) == 0 && r->hdr.error_no == 0;
}

/* Turns a region access reply into the return convention of the helpers. */
static int
access_result(struct reply *r, uint32_t region, uint64_t offset,
              uint32_t count, bool is_read, void *out)
{
    const struct vfio_user_region_access *ra;
    size_t want_len = sizeof(*ra) + (is_read ? count : 0);

    if (!reply_is_ok(r)) {
        int err = r->hdr.error_no != 0 ? (int)r->hdr.error_no : -1;
        return err;
    }
    if (r->len != want_len) {
        fprintf(stderr, "region access reply of %zu bytes, want %zu\n",
                r->len, want_len);
        return -1;
    }
    ra = (const struct vfio_user_region_access *)r->body;
    if (ra->region != region || ra->offset != offset || ra->count != count) {
        fprintf(stderr, "region access reply echoes region %u offset %#" PRIx64
                " count %u, want %u %#" PRIx64 " %u\n", ra->region, ra->offset,
                ra->count, region, offset, count);
        return -1;
    }
    if (is_read && out != NULL) {
        memcpy(out, ra->data, count);
    }
    return 0;
}

int
client_region_read(int sock, uint32_t region, uint64_t offset, uint32_t count,
                   void *out)
{
    struct vfio_user_region_access ra = {
        .offset = offset, .region = region, .count = count,
    };
    struct reply r;
    int ret;

    if (client_call(sock, VFIO_USER_REGION_READ, &ra, sizeof(ra), NULL, 0, &r) < 0) {
        return -1;
    }
    ret = access_result(&r, region, offset, count, true, out);
    reply_free(&r);
    return ret;
}

int
client_region_write(int sock, uint32_t region, uint64_t offset, uint32_t count,
                    const void *data)
{
    size_t len = sizeof(struct vfio_user_region_access) + count;
    struct vfio_user_region_access *ra = calloc(1, len);
    struct reply r;
    int ret;

    if (ra == NULL) {
        return -1;
    }
    ra->offset = offset;
    ra->region = region;
    ra->count = count;
    memcpy(ra->data, data, count);
    ret = client_call(sock, VFIO_USER_REGION_WRITE, ra, len, NULL, 0, &r);
    free(ra);
    if (ret < 0) {
        return -1;
    }
    ret = access_result(&r, region, offset, count, false, NULL);
    reply_free(&r);
    return ret;
}

bool
json_get_uint(const char *json, const char *key, uint64_t *value)
{
    size_t klen = strlen(key);
    const char *p = json;

    while ((p = strchr(p, '"')) != NULL) {
        const char *q;
        char *end;

        p++;
        if (strncmp(p, key, klen) != 0 || p[klen] != '"') {
            /* Skip to the end of this string. */
            q = strchr(p, '"');
            if (q == NULL) {
                return false;
            }
            p = q + 1;
            continue;
        }
        q = p + klen + 1;
        while (isspace((unsigned char)*q)) {
            q++;
        }
        if (*q != ':') {
            p = q;
            continue;
        }
        q++;
        while (isspace((unsigned char)*q)) {
            q++;
        }
        if (!isdigit((unsigned char)*q)) {
            return false;
        }
        errno = 0;
        *value = strtoull(q, &end, 10);
        return errno == 0 && end != q;
    }
    return false;
}
