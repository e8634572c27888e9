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
 * thread and for two threads on two CPUs. The calls alone (no copy) are
 * also timed, for a stub library of three functions that return at once
 * and for each library, in interleaved slices of each round, with the
 * library's cost beyond the stub and ratios paired round by round.
 *
 * Two more rows: vfu_run_ctx on an attached non-blocking context with nothing
 * pending (SPDK polls it), and VFIO_USER_MIG_DATA_READ of 1 MiB chunks round
 * trip against a socket floor (a plain thread that answers the same request
 * with the same number of bytes).
 *
 * Files: this one (devices, I/O rows, main), bench_util.c (timing,
 * statistics, library loading, the vfio-user client), mig_read.c (the
 * MIG_DATA_READ row), spdk_io.h. Built and run by `make bench-io`.
 *
 * -q: fewer, shorter rounds (a smoke run). -r N: N rounds (default 15).
 * -o ROWS: only these rows, a comma-separated list of io1, io4, io64, run
 * and mig (e.g. for instruction counts under valgrind).
 */


#include "spdk_io.h"

int rounds = 15;
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
uint64_t ios_per_round = 200000;

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

/*
 * The calls' own floor: a "library" whose three functions return at once
 * (the sgl_get stub fills the iovec). The same loop through it costs the
 * loop and three indirect calls; a library's calls-only time beyond it is
 * the work the library does.
 */
static int
stub_addr_to_sgl(vfu_ctx_t *ctx, vfu_dma_addr_t addr, size_t len, dma_sg_t *sg,
                 size_t max, int prot)
{
    (void)ctx, (void)addr, (void)len, (void)sg, (void)max, (void)prot;
    return 1;
}

static int
stub_sgl_get(vfu_ctx_t *ctx, dma_sg_t *sg, struct iovec *iov, size_t cnt, int flags)
{
    (void)ctx, (void)cnt, (void)flags;
    iov->iov_base = sg;
    iov->iov_len = IO_SIZE;
    return 0;
}

static void
stub_sgl_put(vfu_ctx_t *ctx, dma_sg_t *sg, struct iovec *iov, size_t cnt)
{
    (void)ctx, (void)sg, (void)iov, (void)cnt;
}

static struct lib stub_lib = { .path = "(stub)", .name = "stub" };
static struct dev stub_dev = { .lib = &stub_lib };

/* Fills stub_lib through volatile reads, so that the compiler cannot see
 * which functions the loop calls (and inline them). */
static void
stub_init(void)
{
    __typeof__(&vfu_addr_to_sgl) volatile a = stub_addr_to_sgl;
    __typeof__(&vfu_sgl_get) volatile g = stub_sgl_get;
    __typeof__(&vfu_sgl_put) volatile p = stub_sgl_put;

    stub_lib.addr_to_sgl = a;
    stub_lib.sgl_get = g;
    stub_lib.sgl_put = p;
}

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
    uint64_t ios;
    double ns;
};

static void *
job_thread(void *arg)
{
    struct job *j = arg;

    pin(1);
    pthread_barrier_wait(j->bar);
    j->ns = j->dev ? lib_loop(j->dev, 1, j->ios, j->copy) : floor_loop(1, j->ios);
    return NULL;
}

/*
 * Per-thread ns per I/O of `ios` I/Os with `threads` threads (1 or 2)
 * running `dev` (NULL: the floor); without `copy`, only the library calls.
 */
static double
measure_n(struct dev *dev, int threads, bool copy, uint64_t ios)
{
    pthread_barrier_t bar;
    pthread_t t;
    struct job j = { .bar = &bar, .dev = dev, .copy = copy, .ios = ios };
    double ns;

    if (threads == 1) {
        return dev ? lib_loop(dev, 0, ios, copy) : floor_loop(0, ios);
    }
    pthread_barrier_init(&bar, NULL, 2);
    if (pthread_create(&t, NULL, job_thread, &j) != 0) {
        die("pthread_create");
    }
    pthread_barrier_wait(&bar);
    ns = dev ? lib_loop(dev, 0, ios, copy) : floor_loop(0, ios);
    pthread_join(t, NULL);
    pthread_barrier_destroy(&bar);
    if (ns < 0 || j.ns < 0) {
        return -1;
    }
    return (ns + j.ns) / 2;
}

/* measure_n() of a round's worth of I/Os. */
static double
measure(struct dev *dev, int threads, bool copy)
{
    return measure_n(dev, threads, copy, ios_per_round);
}

/*
 * One round of the calls-only rows: the stub and every library, each for a
 * round's worth of I/Os, taken in SLICES interleaved slices (the order of
 * the libraries rotating from slice to slice), so that a slow spell of the
 * machine (a neighbour, a frequency change) falls on all of them alike.
 * Their per-I/O times go to *stub and calls[i].
 */
#define SLICES 20
static void
measure_calls(int threads, double *stub, double *calls)
{
    uint64_t ios = ios_per_round / SLICES;
    double s = 0, c[MAX_LIBS] = { 0 };

    for (int z = 0; z < SLICES; z++) {
        s += measure_n(&stub_dev, threads, false, ios);
        for (int k = 0; k < nr_libs; k++) {
            int i = (k + z) % nr_libs;
            double x = measure_n(&devs[i], threads, false, ios);

            if (x < 0) {
                exit(1);
            }
            c[i] += x;
        }
    }
    *stub = s / SLICES;
    for (int i = 0; i < nr_libs; i++) {
        calls[i] = c[i] / SLICES;
    }
}

static void
bench_io(int n)
{
    double floor_ns[2][64], lib_ns[2][MAX_LIBS][64], beyond[2][MAX_LIBS][64];
    double calls[2][MAX_LIBS][64], stub_ns[2][64];
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

            double c[MAX_LIBS];

            floor_ns[th - 1][r] = f;
            for (int i = 0; i < nr_libs; i++) {
                double x = measure(&devs[i], th, true);

                if (x < 0) {
                    exit(1);
                }
                lib_ns[th - 1][i][r] = x;
                beyond[th - 1][i][r] = x - f;
            }
            measure_calls(th, &stub_ns[th - 1][r], c);
            for (int i = 0; i < nr_libs; i++) {
                calls[th - 1][i][r] = c[i];
            }
        }
        snprintf(row, sizeof(row), "%d region%s, %d thread%s", n, n > 1 ? "s" : "",
                 th, th > 1 ? "s" : "");
        /* Paired per round (report() sorts its arrays, so first). */
        report_paired(calls[th - 1], stub_ns[th - 1], rounds, nr_libs);
        report(row, "floor", floor_ns[th - 1], NULL, NULL, rounds);
        report(row, "stub", stub_ns[th - 1], NULL, NULL, rounds);
        for (int i = 0; i < nr_libs; i++) {
            report(row, libs[i].name, lib_ns[th - 1][i], beyond[th - 1][i],
                   calls[th - 1][i], rounds);
        }
        print_paired();
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
    stub_init();
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
