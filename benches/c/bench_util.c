/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * The spdk_io benchmark's plumbing: timing and statistics, loading the
 * libraries, a minimal vfio-user client, and the report lines.
 */

#include "spdk_io.h"

/* ------------------------------------------------------------------------ */
/* Helpers                                                                  */
/* ------------------------------------------------------------------------ */

void
die(const char *what)
{
    fprintf(stderr, "spdk_io: %s: %s\n", what, strerror(errno));
    exit(1);
}

uint64_t
now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

void
pin(int cpu)
{
    cpu_set_t set;

    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    /* Unpinned if it fails (fewer CPUs): the numbers are still valid. */
    (void)pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
}

static int
cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;

    return (x > y) - (x < y);
}


struct stat3
stats(double *v, int n)
{
    struct stat3 s;

    qsort(v, (size_t)n, sizeof(*v), cmp_double);
    s.min = v[0];
    s.max = v[n - 1];
    s.med = n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
    return s;
}

/* ------------------------------------------------------------------------ */
/* The libraries                                                            */
/* ------------------------------------------------------------------------ */


struct lib libs[MAX_LIBS];
int nr_libs;

void *
sym(struct lib *l, const char *name)
{
    void *p = dlsym(l->handle, name);

    if (p == NULL) {
        fprintf(stderr, "spdk_io: %s: no symbol %s\n", l->path, name);
        exit(1);
    }
    return p;
}

void
load(struct lib *l, const char *arg)
{
    const char *eq = strchr(arg, '=');
    const char *path = arg;

    l->name = arg;
    if (eq != NULL && strchr(eq, '/') != NULL && memchr(arg, '/', (size_t)(eq - arg)) == NULL) {
        l->name = strndup(arg, (size_t)(eq - arg));
        path = eq + 1;
    }
    l->path = path;
    l->handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (l->handle == NULL) {
        fprintf(stderr, "spdk_io: %s\n", dlerror());
        exit(1);
    }
    l->create_ctx = sym(l, "vfu_create_ctx");
    l->pci_init = sym(l, "vfu_pci_init");
    l->setup_device_dma = sym(l, "vfu_setup_device_dma");
    l->setup_migration = sym(l, "vfu_setup_device_migration_callbacks");
    l->realize_ctx = sym(l, "vfu_realize_ctx");
    l->attach_ctx = sym(l, "vfu_attach_ctx");
    l->run_ctx = sym(l, "vfu_run_ctx");
    l->destroy_ctx = sym(l, "vfu_destroy_ctx");
    l->addr_to_sgl = sym(l, "vfu_addr_to_sgl");
    l->sgl_get = sym(l, "vfu_sgl_get");
    l->sgl_put = sym(l, "vfu_sgl_put");
    l->sg_size = sym(l, "dma_sg_size");
}

/* ------------------------------------------------------------------------ */
/* A minimal vfio-user client                                               */
/* ------------------------------------------------------------------------ */

static uint16_t next_msg_id;

int
send_msg(int sock, uint16_t cmd, const void *body, size_t len, int fd)
{
    struct vfio_user_header h = {
        .msg_id = ++next_msg_id,
        .cmd = cmd,
        .msg_size = (uint32_t)(sizeof(h) + len),
        .flags = VFIO_USER_F_TYPE_COMMAND,
    };
    struct iovec iov[2] = {
        { .iov_base = &h, .iov_len = sizeof(h) },
        { .iov_base = (void *)body, .iov_len = len },
    };
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } ctl;
    struct msghdr m = { .msg_iov = iov, .msg_iovlen = len ? 2 : 1 };

    if (fd >= 0) {
        struct cmsghdr *c;

        memset(&ctl, 0, sizeof(ctl));
        m.msg_control = ctl.buf;
        m.msg_controllen = sizeof(ctl.buf);
        c = CMSG_FIRSTHDR(&m);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(c), &fd, sizeof(int));
    }
    return sendmsg(sock, &m, 0) == (ssize_t)(sizeof(h) + len) ? 0 : -1;
}

/* Receives a reply of at most cap body bytes; returns the body length. */
ssize_t
recv_reply(int sock, void *body, size_t cap)
{
    struct vfio_user_header h;
    size_t len;

    if (recv(sock, &h, sizeof(h), MSG_WAITALL) != (ssize_t)sizeof(h)) {
        return -1;
    }
    if (h.msg_size < sizeof(h) || h.msg_size - sizeof(h) > cap) {
        errno = EPROTO;
        return -1;
    }
    len = h.msg_size - sizeof(h);
    if (len > 0 && recv(sock, body, len, MSG_WAITALL) != (ssize_t)len) {
        return -1;
    }
    if (h.flags & VFIO_USER_F_ERROR) {
        errno = (int)h.error_no;
        return -1;
    }
    return (ssize_t)len;
}

int
call(int sock, uint16_t cmd, const void *body, size_t len, int fd)
{
    char reply[256];

    if (send_msg(sock, cmd, body, len, fd) < 0) {
        return -1;
    }
    return recv_reply(sock, reply, sizeof(reply)) < 0 ? -1 : 0;
}

int
connect_to(const char *path)
{
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    int s = socket(AF_UNIX, SOCK_STREAM, 0);

    if (s < 0) {
        die("socket");
    }
    snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", path);
    for (int i = 0; i < 5000; i++) {
        if (connect(s, (struct sockaddr *)&sa, sizeof(sa)) == 0) {
            return s;
        }
        usleep(1000);
    }
    die("connect");
    return -1;
}

int
send_version(int sock)
{
    static const char json[] =
        "{\"capabilities\":{\"max_msg_fds\":8,"
        "\"migration\":{\"pgsize\":4096}}}";
    char body[sizeof(json) + 4];

    body[0] = 0; /* major 0 */
    body[1] = 0;
    body[2] = 1; /* minor 1 */
    body[3] = 0;
    memcpy(body + 4, json, sizeof(json));
    return send_msg(sock, VFIO_USER_VERSION, body, sizeof(body), -1);
}

int
set_mig_state(int sock, uint32_t state)
{
    struct {
        uint32_t argsz, flags, state, data_fd;
    } f = {
        .argsz = 16,
        .flags = VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
        .state = state,
    };

    return call(sock, VFIO_USER_DEVICE_FEATURE, &f, sizeof(f), -1);
}

void
print_header(void)
{
    printf("%-34s %-12s %24s %24s %24s\n", "row", "library", "ns/op median [min-max]",
           "beyond floor [min-max]", "calls only [min-max]");
}

void
report(const char *row, const char *lib, double *v, double *extra, double *calls, int n)
{
    struct stat3 s = stats(v, n);

    printf("%-34s %-12s %8.1f [%6.1f-%7.1f]", row, lib, s.med, s.min, s.max);
    if (extra) {
        struct stat3 e = stats(extra, n);

        printf(" %8.1f [%6.1f-%7.1f]", e.med, e.min, e.max);
    }
    if (calls) {
        struct stat3 c = stats(calls, n);

        printf(" %8.1f [%6.1f-%7.1f]", c.med, c.min, c.max);
    }
    printf("\n");
}


/* What report_paired() computed, printed by print_paired(). */
static char paired_text[2048];

void
report_paired(double calls[][64], const double *stub, int n, int nlibs)
{
    double own[MAX_LIBS][64], v[64];
    size_t len = 0;

    for (int i = 0; i < nlibs; i++) {
        for (int r = 0; r < n; r++) {
            own[i][r] = calls[i][r] - stub[r];
        }
    }
    paired_text[0] = '\0';
    for (int i = 0; i < nlibs && len < sizeof(paired_text); i++) {
        struct stat3 s;

        memcpy(v, own[i], sizeof(double) * (size_t)n);
        s = stats(v, n);
        len += (size_t)snprintf(paired_text + len, sizeof(paired_text) - len,
                                "  %-32s %-12s %8.1f [%6.1f-%7.1f]\n",
                                "calls beyond the stub", libs[i].name, s.med, s.min, s.max);
    }
    for (int i = 1; i < nlibs && len < sizeof(paired_text); i++) {
        struct stat3 c, o;

        for (int r = 0; r < n; r++) {
            v[r] = calls[0][r] / calls[i][r];
        }
        c = stats(v, n);
        for (int r = 0; r < n; r++) {
            v[r] = own[i][r] > 0 ? own[0][r] / own[i][r] : 0;
        }
        o = stats(v, n);
        len += (size_t)snprintf(paired_text + len, sizeof(paired_text) - len,
                                "  %s / %s, paired per round: calls only %.2fx [%.2f-%.2f],"
                                " beyond the stub %.2fx [%.2f-%.2f]\n",
                                libs[0].name, libs[i].name, c.med, c.min, c.max, o.med,
                                o.min, o.max);
    }
}

void
print_paired(void)
{
    fputs(paired_text, stdout);
}
