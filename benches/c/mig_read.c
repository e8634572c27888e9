/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * The MIG_DATA_READ row of the spdk_io benchmark: 1 MiB chunks read from a
 * device in STOP_COPY, against a socket floor answering the same request
 * with the same bytes.
 */

#include "spdk_io.h"


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

void
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

