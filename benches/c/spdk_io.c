/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * SPDK's per-I/O DMA call pattern, through the exported C functions of one or
 * more libvfio-user.so.0 builds loaded side by side in this process.
 *
 * usage: spdk_io [-q] [-r ROUNDS] [-o ROWS] [NAME=]LIB.so [[NAME=]LIB.so ...]
 *
 * NAME (default: the path) labels a library's rows.
 * Every library is opened with dlopen(RTLD_LOCAL) from the path given, so two
 * builds of the same soname (ours and upstream's, say) run in one process,
 * measured in interleaved rounds on the same memory. Only the 2026 upstream
 * API is used, so any build of it works.
 *
 * For each library a device context is created (non-blocking attach, DMA
 * with register/unregister callbacks) and a client thread of this process
 * speaks vfio-user to it over its socket: VERSION, then DMA_MAP of memfd
 * regions passed with SCM_RIGHTS. Then, for 1, 4 and 64 regions of 2-256
 * MiB, each I/O on a random 4 KiB-aligned address inside them is
 *
 *     vfu_addr_to_sgl(ctx, addr, 4096, sg, 1, PROT_READ | PROT_WRITE);
 *     vfu_sgl_get(ctx, sg, &iov, 1, 0);
 *     memcpy(buf, iov.iov_base, 4096);
 *     vfu_sgl_put(ctx, sg, &iov, 1);
 *
 * and the floor is the same 4 KiB memcpy from the same addresses (through
 * the client's own mapping of the same pages), timed in the same rounds.
 * Reported: ns per I/O, and the library's cost beyond the floor, for one
 * thread and for two threads on two CPUs.
 *
 * Two more rows: vfu_run_ctx on an attached non-blocking context with nothing
 * pending (SPDK polls it), and VFIO_USER_MIG_DATA_READ of 1 MiB chunks round
 * trip against a socket floor (a plain thread that answers the same request
 * with the same number of bytes).
 *
 * -q: fewer, shorter rounds (a smoke run). -r N: N rounds (default 15).
 * -o ROWS: only these rows, a comma-separated list of io1, io4, io64, run
 * and mig (e.g. for instruction counts under valgrind).
 */

#define _GNU_SOURCE /* memfd_create, pthread_setaffinity_np */
#include <dlfcn.h>
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <vfio-user/libvfio-user.h>

#define MAX_LIBS 4
#define MAX_REGIONS 64
#define IO_SIZE 4096
/* Distinct addresses an I/O loop cycles through (16 MiB of buffers). */
#define NR_ADDRS 4096
#define MIG_CHUNK (1u << 20)

static int rounds = 15;
static const char *only;

/* Whether row `name` is to run (-o). */
static bool
wanted(const char *name)
{
    size_t n = strlen(name);

    if (only == NULL) {
        return true;
    }
    for (const char *p = only; (p = strstr(p, name)) != NULL; p += n) {
        if ((p == only || p[-1] == ',') && (p[n] == ',' || p[n] == '\0')) {
            return true;
        }
    }
    return false;
}
static uint64_t ios_per_round = 200000;

/* ------------------------------------------------------------------------ */
/* Helpers                                                                  */
/* ------------------------------------------------------------------------ */

static void
die(const char *what)
{
    fprintf(stderr, "spdk_io: %s: %s\n", what, strerror(errno));
    exit(1);
}

static uint64_t
now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void
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

/* Median, min and max of n samples (sorts them). */
struct stat3 {
    double med, min, max;
};

static struct stat3
stats(double *v, int n)
{
    struct stat3 s;

    qsort(v, (size_t)n, sizeof(*v), cmp_double);
    s.min = v[0];
    s.max = v[n - 1];
    s.med = n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
    return s;
}

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

static uint64_t
rnd(void)
{
    /* xorshift64* */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 0x2545f4914f6cdd1dull;
}

/* ------------------------------------------------------------------------ */
/* The libraries                                                            */
/* ------------------------------------------------------------------------ */

struct lib {
    const char *path;
    const char *name;
    void *handle;
    __typeof__(&vfu_create_ctx) create_ctx;
    __typeof__(&vfu_pci_init) pci_init;
    __typeof__(&vfu_setup_device_dma) setup_device_dma;
    __typeof__(&vfu_setup_device_migration_callbacks) setup_migration;
    __typeof__(&vfu_realize_ctx) realize_ctx;
    __typeof__(&vfu_attach_ctx) attach_ctx;
    __typeof__(&vfu_run_ctx) run_ctx;
    __typeof__(&vfu_destroy_ctx) destroy_ctx;
    __typeof__(&vfu_addr_to_sgl) addr_to_sgl;
    __typeof__(&vfu_sgl_get) sgl_get;
    __typeof__(&vfu_sgl_put) sgl_put;
    __typeof__(&dma_sg_size) sg_size;
};

static struct lib libs[MAX_LIBS];
static int nr_libs;

static void *
sym(struct lib *l, const char *name)
{
    void *p = dlsym(l->handle, name);

    if (p == NULL) {
        fprintf(stderr, "spdk_io: %s: no symbol %s\n", l->path, name);
        exit(1);
    }
    return p;
}

static void
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

static int
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
static ssize_t
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

static int
call(int sock, uint16_t cmd, const void *body, size_t len, int fd)
{
    char reply[256];

    if (send_msg(sock, cmd, body, len, fd) < 0) {
        return -1;
    }
    return recv_reply(sock, reply, sizeof(reply)) < 0 ? -1 : 0;
}

static int
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

static int
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

static int
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

/* ------------------------------------------------------------------------ */
/* DMA setup: one context per library, regions shared by all of them       */
/* ------------------------------------------------------------------------ */

struct region {
    uint64_t iova, size;
    int fd;
    uint8_t *local; /* the client's own mapping of the same pages */
};

static struct region regions[MAX_REGIONS];

struct dev {
    struct lib *lib;
    vfu_ctx_t *ctx;
    int sock;
    char path[108];
    atomic_int phase; /* 1: version sent, 2: regions mapped, <0: failed */
    int nr_regions;
};

static struct dev devs[MAX_LIBS];

static void
dma_register(vfu_ctx_t *ctx, vfu_dma_info_t *info)
{
    (void)ctx;
    (void)info;
}

static void
dma_unregister(vfu_ctx_t *ctx, vfu_dma_info_t *info)
{
    (void)ctx;
    (void)info;
}

static void *
dma_client(void *arg)
{
    struct dev *d = arg;
    char reply[1024];

    d->sock = connect_to(d->path);
    if (send_version(d->sock) < 0) {
        atomic_store(&d->phase, -1);
        return NULL;
    }
    atomic_store(&d->phase, 1);
    if (recv_reply(d->sock, reply, sizeof(reply)) < 0) {
        atomic_store(&d->phase, -1);
        return NULL;
    }
    for (int i = 0; i < d->nr_regions; i++) {
        struct vfio_user_dma_map m = {
            .argsz = sizeof(m),
            .flags = VFIO_USER_F_DMA_REGION_READ | VFIO_USER_F_DMA_REGION_WRITE,
            .offset = 0,
            .addr = regions[i].iova,
            .size = regions[i].size,
        };

        if (call(d->sock, VFIO_USER_DMA_MAP, &m, sizeof(m), regions[i].fd) < 0) {
            fprintf(stderr, "spdk_io: DMA_MAP: %s\n", strerror(errno));
            atomic_store(&d->phase, -1);
            return NULL;
        }
    }
    atomic_store(&d->phase, 2);
    return NULL;
}

/* Creates the device of `l` and maps the first n regions into it. */
static void
dev_start(struct dev *d, struct lib *l, int n)
{
    pthread_t t;

    memset(d, 0, sizeof(*d));
    d->lib = l;
    d->nr_regions = n;
    snprintf(d->path, sizeof(d->path), "/tmp/spdk-io-%d-%d.sock", getpid(),
             (int)(l - libs));
    unlink(d->path);
    d->ctx = l->create_ctx(VFU_TRANS_SOCK, d->path, LIBVFIO_USER_FLAG_ATTACH_NB,
                           NULL, VFU_DEV_TYPE_PCI);
    if (d->ctx == NULL) {
        die("vfu_create_ctx");
    }
    if (l->pci_init(d->ctx, VFU_PCI_TYPE_EXPRESS, PCI_HEADER_TYPE_NORMAL, 0) < 0) {
        die("vfu_pci_init");
    }
    if (l->setup_device_dma(d->ctx, MAX_REGIONS, dma_register, dma_unregister) < 0) {
        die("vfu_setup_device_dma");
    }
    if (l->realize_ctx(d->ctx) < 0) {
        die("vfu_realize_ctx");
    }
    if (pthread_create(&t, NULL, dma_client, d) != 0) {
        die("pthread_create");
    }
    /* Attach once the VERSION request is queued on the socket. */
    while (atomic_load(&d->phase) == 0) {
        sched_yield();
    }
    while (l->attach_ctx(d->ctx) < 0) {
        if (errno != EAGAIN && errno != EINTR) {
            die("vfu_attach_ctx");
        }
        sched_yield();
    }
    while (atomic_load(&d->phase) == 1) {
        if (l->run_ctx(d->ctx) < 0 && errno != EAGAIN && errno != EINTR) {
            die("vfu_run_ctx");
        }
    }
    pthread_join(t, NULL);
    if (atomic_load(&d->phase) != 2) {
        fprintf(stderr, "spdk_io: %s: mapping failed\n", l->path);
        exit(1);
    }
}

static void
dev_stop(struct dev *d)
{
    d->lib->destroy_ctx(d->ctx);
    close(d->sock);
}

/* Regions: sizes cycle through 256, 2, 64, 8, 128, 4, 32, 16 MiB, 1 GiB apart. */
static void
make_regions(void)
{
    static const unsigned mib[8] = { 256, 2, 64, 8, 128, 4, 32, 16 };

    for (int i = 0; i < MAX_REGIONS; i++) {
        struct region *r = &regions[i];

        r->iova = (uint64_t)(i + 1) << 30;
        r->size = (uint64_t)mib[i % 8] << 20;
        r->fd = memfd_create("spdk-io", 0);
        if (r->fd < 0 || ftruncate(r->fd, (off_t)r->size) < 0) {
            die("memfd");
        }
        r->local = mmap(NULL, r->size, PROT_READ | PROT_WRITE, MAP_SHARED, r->fd, 0);
        if (r->local == MAP_FAILED) {
            die("mmap");
        }
    }
}

/* ------------------------------------------------------------------------ */
/* The I/O loops                                                            */
/* ------------------------------------------------------------------------ */

struct addr {
    uint64_t iova;
    uint8_t *local;
};

/* Per-thread address lists (each thread its own random addresses). */
static struct addr addrs[2][NR_ADDRS];

static void
pick_addrs(int n)
{
    uint64_t total = 0;

    for (int i = 0; i < n; i++) {
        total += regions[i].size;
    }
    for (int t = 0; t < 2; t++) {
        for (int k = 0; k < NR_ADDRS; k++) {
            /* Uniform over the mapped bytes, 4 KiB aligned. */
            uint64_t off = (rnd() % (total / IO_SIZE)) * IO_SIZE;
            int i = 0;

            while (off >= regions[i].size) {
                off -= regions[i].size;
                i++;
            }
            addrs[t][k].iova = regions[i].iova + off;
            addrs[t][k].local = regions[i].local + off;
            /* Fault the page in before anything is timed. */
            memset(addrs[t][k].local, (int)k, IO_SIZE);
        }
    }
}

static volatile uint8_t sink;

/* The floor: a 4 KiB copy from each address. Returns ns per I/O. */
static double
floor_loop(int t, uint64_t n)
{
    static __thread uint8_t buf[IO_SIZE] __attribute__((aligned(64)));
    uint8_t acc = 0;
    uint64_t start = now_ns();

    for (uint64_t k = 0; k < n; k++) {
        const struct addr *a = &addrs[t][k % NR_ADDRS];

        memcpy(buf, a->local, IO_SIZE);
        acc ^= buf[k % IO_SIZE];
    }
    sink = acc;
    return (double)(now_ns() - start) / (double)n;
}

/* SPDK's pattern through library `d`. Returns ns per I/O, or -1. */
static double
lib_loop(struct dev *d, int t, uint64_t n, bool copy)
{
    static __thread uint8_t buf[IO_SIZE] __attribute__((aligned(64)));
    static __thread uint64_t sgmem[64];
    struct lib *l = d->lib;
    vfu_ctx_t *ctx = d->ctx;
    dma_sg_t *sg = (dma_sg_t *)sgmem;
    uint8_t acc = 0;
    uint64_t start = now_ns();

    for (uint64_t k = 0; k < n; k++) {
        const struct addr *a = &addrs[t][k % NR_ADDRS];
        struct iovec iov;

        if (l->addr_to_sgl(ctx, (vfu_dma_addr_t)(uintptr_t)a->iova, IO_SIZE, sg, 1,
                           PROT_READ | PROT_WRITE) != 1 ||
            l->sgl_get(ctx, sg, &iov, 1, 0) != 0) {
            fprintf(stderr, "spdk_io: %s: I/O failed: %s\n", l->path, strerror(errno));
            return -1;
        }
        if (copy) {
            memcpy(buf, iov.iov_base, IO_SIZE);
            acc ^= buf[k % IO_SIZE];
        } else {
            acc ^= (uint8_t)(uintptr_t)iov.iov_base;
        }
        l->sgl_put(ctx, sg, &iov, 1);
    }
    sink = acc;
    return (double)(now_ns() - start) / (double)n;
}

/* One measurement for the second thread of the two-thread rows. */
struct job {
    pthread_barrier_t *bar;
    struct dev *dev; /* NULL: floor */
    bool copy;
    double ns;
};

static void *
job_thread(void *arg)
{
    struct job *j = arg;

    pin(1);
    pthread_barrier_wait(j->bar);
    j->ns = j->dev ? lib_loop(j->dev, 1, ios_per_round, j->copy)
                   : floor_loop(1, ios_per_round);
    return NULL;
}

/*
 * Per-thread ns per I/O with `threads` threads (1 or 2) running `dev` (NULL:
 * the floor); without `copy`, only the library calls.
 */
static double
measure(struct dev *dev, int threads, bool copy)
{
    pthread_barrier_t bar;
    pthread_t t;
    struct job j = { .bar = &bar, .dev = dev, .copy = copy };
    double ns;

    if (threads == 1) {
        return dev ? lib_loop(dev, 0, ios_per_round, copy) : floor_loop(0, ios_per_round);
    }
    pthread_barrier_init(&bar, NULL, 2);
    if (pthread_create(&t, NULL, job_thread, &j) != 0) {
        die("pthread_create");
    }
    pthread_barrier_wait(&bar);
    ns = dev ? lib_loop(dev, 0, ios_per_round, copy) : floor_loop(0, ios_per_round);
    pthread_join(t, NULL);
    pthread_barrier_destroy(&bar);
    if (ns < 0 || j.ns < 0) {
        return -1;
    }
    return (ns + j.ns) / 2;
}

static void
print_header(void)
{
    printf("%-34s %-12s %24s %24s %24s\n", "row", "library", "ns/op median [min-max]",
           "beyond floor [min-max]", "calls only [min-max]");
}

static void
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

static void
bench_io(int n)
{
    double floor_ns[2][64], lib_ns[2][MAX_LIBS][64], beyond[2][MAX_LIBS][64];
    double calls[2][MAX_LIBS][64];
    char row[64];

    for (int i = 0; i < nr_libs; i++) {
        dev_start(&devs[i], &libs[i], n);
        if (libs[i].sg_size() > sizeof(uint64_t) * 64) {
            fprintf(stderr, "spdk_io: dma_sg_size() too large\n");
            exit(1);
        }
    }
    pick_addrs(n);
    for (int th = 1; th <= 2; th++) {
        /* Warm-up: caches, TLBs, lazily allocated per-thread state. */
        for (int i = 0; i < nr_libs; i++) {
            if (measure(&devs[i], th, true) < 0) {
                exit(1);
            }
        }
        for (int r = 0; r < rounds; r++) {
            double f = measure(NULL, th, true);

            floor_ns[th - 1][r] = f;
            for (int i = 0; i < nr_libs; i++) {
                double x = measure(&devs[i], th, true);
                double c = measure(&devs[i], th, false);

                if (x < 0 || c < 0) {
                    exit(1);
                }
                lib_ns[th - 1][i][r] = x;
                beyond[th - 1][i][r] = x - f;
                calls[th - 1][i][r] = c;
            }
        }
        snprintf(row, sizeof(row), "%d region%s, %d thread%s", n, n > 1 ? "s" : "",
                 th, th > 1 ? "s" : "");
        report(row, "floor", floor_ns[th - 1], NULL, NULL, rounds);
        for (int i = 0; i < nr_libs; i++) {
            report(row, libs[i].name, lib_ns[th - 1][i], beyond[th - 1][i],
                   calls[th - 1][i], rounds);
        }
    }
    for (int i = 0; i < nr_libs; i++) {
        dev_stop(&devs[i]);
    }
}

static void
bench_run_ctx(void)
{
    double v[MAX_LIBS][64];
    uint64_t calls = ios_per_round * 2;

    for (int i = 0; i < nr_libs; i++) {
        dev_start(&devs[i], &libs[i], 1);
    }
    for (int r = 0; r < rounds; r++) {
        for (int i = 0; i < nr_libs; i++) {
            struct dev *d = &devs[i];
            uint64_t start = now_ns();

            for (uint64_t k = 0; k < calls; k++) {
                if (d->lib->run_ctx(d->ctx) != 0) {
                    fprintf(stderr, "spdk_io: vfu_run_ctx: %s\n", strerror(errno));
                    exit(1);
                }
            }
            v[i][r] = (double)(now_ns() - start) / (double)calls;
        }
    }
    for (int i = 0; i < nr_libs; i++) {
        report("vfu_run_ctx, nothing pending (NB)", libs[i].name, v[i], NULL, NULL,
               rounds);
        dev_stop(&devs[i]);
    }
}

/* ------------------------------------------------------------------------ */
/* MIG_DATA_READ                                                            */
/* ------------------------------------------------------------------------ */

static int
mig_transition(vfu_ctx_t *ctx, vfu_migr_state_t state)
{
    (void)ctx;
    (void)state;
    return 0;
}

static ssize_t
mig_read(vfu_ctx_t *ctx, void *buf, uint64_t count)
{
    (void)ctx;
    /* A device that fills the whole chunk (a cheap, non-zero fill). */
    memset(buf, 0x5a, count);
    return (ssize_t)count;
}

static ssize_t
mig_write(vfu_ctx_t *ctx, void *buf, uint64_t count)
{
    (void)ctx;
    (void)buf;
    return (ssize_t)count;
}

struct mig_server {
    struct lib *lib;
    char path[108];
    vfu_ctx_t *ctx;
};

static void *
mig_server_thread(void *arg)
{
    struct mig_server *s = arg;
    struct lib *l = s->lib;

    pin(1);
    if (l->attach_ctx(s->ctx) < 0) {
        die("vfu_attach_ctx (migration)");
    }
    while (l->run_ctx(s->ctx) >= 0) {
    }
    return NULL;
}

/* The socket floor: answers each 24-byte request with the reply's bytes. */
static void *
mig_floor_thread(void *arg)
{
    int sock = (int)(intptr_t)arg;
    static uint8_t body[8 + MIG_CHUNK];
    uint8_t req[sizeof(struct vfio_user_header) + 8];

    pin(1);
    memset(body, 0x5a, sizeof(body));
    while (recv(sock, req, sizeof(req), MSG_WAITALL) == (ssize_t)sizeof(req)) {
        struct vfio_user_header h;
        struct iovec iov[2] = {
            { .iov_base = &h, .iov_len = sizeof(h) },
            { .iov_base = body, .iov_len = sizeof(body) },
        };
        struct msghdr m = { .msg_iov = iov, .msg_iovlen = 2 };

        memcpy(&h, req, sizeof(h));
        h.flags = VFIO_USER_F_TYPE_REPLY;
        h.msg_size = (uint32_t)(sizeof(h) + sizeof(body));
        /* The device's work on the library side: fill the chunk. */
        memset(body + 8, 0x5a, MIG_CHUNK);
        if (sendmsg(sock, &m, 0) != (ssize_t)(sizeof(h) + sizeof(body))) {
            break;
        }
    }
    return NULL;
}

static double
mig_loop(int sock, uint8_t *buf, uint64_t n)
{
    uint32_t req[2] = { 8 + MIG_CHUNK, MIG_CHUNK };
    uint64_t start = now_ns();

    for (uint64_t k = 0; k < n; k++) {
        if (send_msg(sock, VFIO_USER_MIG_DATA_READ, req, sizeof(req), -1) < 0 ||
            recv_reply(sock, buf, 8 + MIG_CHUNK) != 8 + MIG_CHUNK) {
            die("MIG_DATA_READ");
        }
    }
    return (double)(now_ns() - start) / (double)n;
}

static void
bench_mig(void)
{
    static const struct vfu_migration_callbacks_t cbs = {
        .version = VFU_MIGR_CALLBACKS_VERS,
        .transition = mig_transition,
        .read_data = mig_read,
        .write_data = mig_write,
    };
    struct mig_server srv[MAX_LIBS];
    pthread_t st[MAX_LIBS], ft;
    int socks[MAX_LIBS], fsock[2];
    double v[MAX_LIBS][64], fl[64], ratio[MAX_LIBS][64];
    uint64_t n = ios_per_round / 1000 + 10;
    uint8_t *buf = malloc(8 + MIG_CHUNK);
    char reply[1024];

    if (buf == NULL) {
        die("malloc");
    }
    for (int i = 0; i < nr_libs; i++) {
        struct lib *l = &libs[i];

        srv[i].lib = l;
        snprintf(srv[i].path, sizeof(srv[i].path), "/tmp/spdk-io-mig-%d-%d.sock",
                 getpid(), i);
        unlink(srv[i].path);
        srv[i].ctx = l->create_ctx(VFU_TRANS_SOCK, srv[i].path, 0, NULL,
                                   VFU_DEV_TYPE_PCI);
        if (srv[i].ctx == NULL ||
            l->pci_init(srv[i].ctx, VFU_PCI_TYPE_EXPRESS, PCI_HEADER_TYPE_NORMAL, 0) < 0 ||
            l->setup_migration(srv[i].ctx, &cbs) < 0 || l->realize_ctx(srv[i].ctx) < 0) {
            die("migration context");
        }
        if (pthread_create(&st[i], NULL, mig_server_thread, &srv[i]) != 0) {
            die("pthread_create");
        }
        socks[i] = connect_to(srv[i].path);
        if (send_version(socks[i]) < 0 || recv_reply(socks[i], reply, sizeof(reply)) < 0 ||
            set_mig_state(socks[i], VFIO_USER_DEVICE_STATE_STOP) < 0 ||
            set_mig_state(socks[i], VFIO_USER_DEVICE_STATE_STOP_COPY) < 0) {
            die("migration setup");
        }
    }
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, fsock) < 0 ||
        pthread_create(&ft, NULL, mig_floor_thread, (void *)(intptr_t)fsock[1]) != 0) {
        die("floor server");
    }
    for (int i = 0; i < nr_libs; i++) {
        mig_loop(socks[i], buf, 5);
    }
    mig_loop(fsock[0], buf, 5);
    for (int r = 0; r < rounds; r++) {
        fl[r] = mig_loop(fsock[0], buf, n);
        for (int i = 0; i < nr_libs; i++) {
            v[i][r] = mig_loop(socks[i], buf, n);
            ratio[i][r] = v[i][r] / fl[r];
        }
    }
    report("MIG_DATA_READ 1 MiB (ns; x floor)", "socket floor", fl, NULL, NULL, rounds);
    for (int i = 0; i < nr_libs; i++) {
        report("MIG_DATA_READ 1 MiB (ns; x floor)", libs[i].name, v[i], NULL, NULL,
               rounds);
        struct stat3 s = stats(ratio[i], rounds);
        printf("%-34s %-12s %7.3fx [%5.3f-%5.3f]\n", "  ratio to the socket floor",
               libs[i].name, s.med, s.min, s.max);
    }
    close(fsock[0]);
    pthread_join(ft, NULL);
    close(fsock[1]);
    for (int i = 0; i < nr_libs; i++) {
        close(socks[i]);
        pthread_join(st[i], NULL);
        libs[i].destroy_ctx(srv[i].ctx);
    }
    free(buf);
}

int
main(int argc, char **argv)
{
    int opt;

    setvbuf(stdout, NULL, _IOLBF, 0);
    while ((opt = getopt(argc, argv, "qr:o:")) != -1) {
        switch (opt) {
        case 'q':
            rounds = 3;
            ios_per_round = 20000;
            break;
        case 'r':
            rounds = atoi(optarg);
            if (rounds < 1 || rounds > 64) {
                fprintf(stderr, "spdk_io: -r takes 1..64\n");
                return 2;
            }
            break;
        case 'o':
            only = optarg;
            break;
        default:
            goto usage;
        }
    }
    if (optind >= argc || argc - optind > MAX_LIBS) {
        goto usage;
    }
    for (int i = optind; i < argc; i++) {
        load(&libs[nr_libs++], argv[i]);
    }
    for (int i = 1; i < nr_libs; i++) {
        if ((void *)libs[i].addr_to_sgl == (void *)libs[0].addr_to_sgl) {
            fprintf(stderr, "spdk_io: %s and %s are the same loaded library\n",
                    libs[0].path, libs[i].path);
            return 2;
        }
    }
    pin(0);
    make_regions();
    printf("spdk_io: %d rounds of %" PRIu64 " I/Os per side; libraries:\n", rounds,
           ios_per_round);
    for (int i = 0; i < nr_libs; i++) {
        printf("  %s: %s\n", libs[i].name, libs[i].path);
    }
    print_header();
    if (wanted("io1")) {
        bench_io(1);
    }
    if (wanted("io4")) {
        bench_io(4);
    }
    if (wanted("io64")) {
        bench_io(64);
    }
    if (wanted("run")) {
        bench_run_ctx();
    }
    if (wanted("mig")) {
        bench_mig();
    }
    return 0;
usage:
    fprintf(stderr, "usage: %s [-q] [-r ROUNDS] [-o ROWS] [NAME=]LIB.so ...\n", argv[0]);
    return 2;
}
