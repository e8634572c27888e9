/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * Client side of the API-form tests: forks the device of api2025.c or
 * api2026.c (whichever is linked in) and checks, over a real vfio-user
 * connection, what its form promises:
 *
 *   - the server announces the expected max_dma_maps (64 for the 2025
 *     form; for the current one LIBVFIO_USER_MAX_DMA_REGIONS, announced
 *     as 65535, the most QEMU's client accepts);
 *   - that many regions can be mapped (at most 64 are tried), one more is
 *     refused with EINVAL when the limit is 64, and the device's
 *     dma_register callback saw each mapping;
 *   - a transfer started by the device reaches the client as exactly one
 *     DMA_READ and one DMA_WRITE message with the right address, length
 *     and data, and every library call of the device's form returned what
 *     it should.
 *
 * Prints "ok NAME"/"FAIL NAME: why" lines; exits 0 iff nothing failed.
 */

#include "client.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "api_device.h"

#define MAP_BASE 0x10000000ull
#define MAP_STEP 0x10000ull
#define MAP_SIZE 0x1000ull

static char sock_path[108];

static void
device_child(void *arg)
{
    (void)arg;
    if (api_device_main(sock_path) != 0) {
        t_fail("device", "the device side failed (see stderr)");
    }
}

static int
dma_map(int sock, uint64_t addr, struct reply *r)
{
    struct vfio_user_dma_map m;

    memset(&m, 0, sizeof(m));
    m.argsz = sizeof(m);
    m.flags = VFIO_USER_F_DMA_REGION_READ | VFIO_USER_F_DMA_REGION_WRITE;
    m.addr = addr;
    m.size = MAP_SIZE;
    return client_call(sock, VFIO_USER_DMA_MAP, &m, sizeof(m), NULL, 0, r);
}

static uint32_t
bar0_read(int sock, uint32_t offset)
{
    uint32_t v = 0xffffffffu;

    if (client_region_read(sock, VFU_PCI_DEV_BAR0_REGION_IDX, offset, 4, &v) != 0) {
        t_fail("bar0-read", "reading BAR0 at %#x failed", offset);
    }
    return v;
}

static void
check_negotiation(int sock)
{
    struct reply r;
    uint64_t max = 0;
    char *json;

    if (client_version(sock, 0, 2, "{\"capabilities\":{\"max_msg_fds\":8,"
                       "\"max_data_xfer_size\":1048576}}", &r) != 0 ||
        !reply_is_ok(&r) || r.len <= sizeof(struct vfio_user_version)) {
        t_fail("negotiate", "no valid VERSION reply");
        exit(t_status());
    }
    json = strndup((const char *)r.body + sizeof(struct vfio_user_version),
                   r.len - sizeof(struct vfio_user_version));
    if (json != NULL && json_get_uint(json, "max_dma_maps", &max)) {
        uint64_t want = api_expected_max_dma_maps();
        /* The library announces at most 65535 (QEMU's client refuses more). */
        t_check_u64("max-dma-maps", max, want < 65535 ? want : 65535);
    } else {
        t_fail("max-dma-maps", "no max_dma_maps in '%s'", json ? json : "");
    }
    free(json);
    reply_free(&r);
}

static void
check_maps(int sock, uint32_t *nr_mapped)
{
    uint64_t want = api_expected_max_dma_maps();
    uint32_t n = want < 64 ? (uint32_t)want : 64;
    uint32_t i;
    struct reply r;

    for (i = 0; i < n; i++) {
        if (dma_map(sock, MAP_BASE + i * MAP_STEP, &r) != 0 || !reply_is_ok(&r)) {
            t_fail("dma-map", "mapping region %u of %u failed", i, n);
            reply_free(&r);
            break;
        }
        reply_free(&r);
    }
    if (i == n) {
        t_ok("dma-map");
    }
    *nr_mapped = i;
    if (want == n) {
        if (dma_map(sock, MAP_BASE + n * MAP_STEP, &r) == 0) {
            t_check("dma-map-over-limit", reply_is_error(&r, EINVAL),
                    "mapping region %u did not fail with EINVAL (flags %#x errno %u)",
                    n + 1, r.hdr.flags, r.hdr.error_no);
            reply_free(&r);
        } else {
            t_fail("dma-map-over-limit", "no reply");
        }
    }
    t_check_u64("dma-register-calls", bar0_read(sock, API_OFF_NREG), *nr_mapped);
}

/* Serves the device's DMA_READ/DMA_WRITE until the reply to our write. */
static void
check_transfer(int sock)
{
    uint64_t addr = MAP_BASE + 0x100;
    uint8_t pattern[API_XFER_LEN];
    struct vfio_user_region_access *ra;
    uint16_t id = client_next_id();
    size_t len = sizeof(*ra) + 8;
    int nr_read = 0, nr_write = 0;
    bool done = false;
    size_t i;

    for (i = 0; i < API_XFER_LEN; i++) {
        pattern[i] = (uint8_t)(0x30 + i * 7);
    }
    ra = (struct vfio_user_region_access *)calloc(1, len);
    if (ra == NULL) {
        t_fail("transfer", "out of memory");
        return;
    }
    ra->offset = API_OFF_DMA;
    ra->region = VFU_PCI_DEV_BAR0_REGION_IDX;
    ra->count = 8;
    memcpy(ra->data, &addr, 8);
    if (client_send(sock, id, VFIO_USER_REGION_WRITE, VFIO_USER_F_TYPE_COMMAND,
                    ra, len, NULL, 0) != 0) {
        t_fail("transfer", "sending the region write failed");
        free(ra);
        return;
    }
    free(ra);

    while (!done) {
        struct reply r;
        const struct vfio_user_dma_region_access *a;
        uint8_t out[sizeof(*a) + API_XFER_LEN];
        struct vfio_user_dma_region_access *o = (struct vfio_user_dma_region_access *)out;

        if (client_recv(sock, &r, CLIENT_TIMEOUT_MS) != 0) {
            t_fail("transfer", "receive failed: %s", strerror(errno));
            return;
        }
        a = (const struct vfio_user_dma_region_access *)r.body;
        switch (r.hdr.cmd) {
        case VFIO_USER_DMA_READ:
            nr_read++;
            t_check("dma-read-request", r.len == sizeof(*a) && a->addr == addr &&
                    a->count == API_XFER_LEN, "DMA_READ len %zu addr %#llx count %llu",
                    r.len, r.len >= sizeof(*a) ? (unsigned long long)a->addr : 0,
                    r.len >= sizeof(*a) ? (unsigned long long)a->count : 0);
            o->addr = addr;
            o->count = API_XFER_LEN;
            memcpy(o->data, pattern, API_XFER_LEN);
            client_send(sock, r.hdr.msg_id, VFIO_USER_DMA_READ, VFIO_USER_F_TYPE_REPLY,
                        out, sizeof(out), NULL, 0);
            break;
        case VFIO_USER_DMA_WRITE: {
            bool inverted = r.len == sizeof(*a) + API_XFER_LEN && a->addr == addr &&
                            a->count == API_XFER_LEN;
            for (i = 0; inverted && i < API_XFER_LEN; i++) {
                inverted = (a->data[i] ^ pattern[i]) == 0xff;
            }
            nr_write++;
            t_check("dma-write-data", inverted, "DMA_WRITE does not carry the inverted pattern");
            o->addr = addr;
            o->count = API_XFER_LEN;
            client_send(sock, r.hdr.msg_id, VFIO_USER_DMA_WRITE, VFIO_USER_F_TYPE_REPLY,
                        out, sizeof(*o), NULL, 0);
            break;
        }
        case VFIO_USER_REGION_WRITE:
            t_check("region-write-reply", r.hdr.msg_id == id && reply_is_ok(&r),
                    "region write reply msg_id %#x flags %#x errno %u", r.hdr.msg_id,
                    r.hdr.flags, r.hdr.error_no);
            done = true;
            break;
        default:
            t_fail("transfer", "unexpected message, command %u", r.hdr.cmd);
            done = true;
            break;
        }
        reply_free(&r);
    }
    t_check("dma-message-count", nr_read == 1 && nr_write == 1,
            "%d DMA_READ and %d DMA_WRITE messages, expected 1 and 1", nr_read, nr_write);
    t_check_u64("device-status", bar0_read(sock, API_OFF_STATUS), 0);
    t_check_u64("device-errno", bar0_read(sock, API_OFF_ERRNO), 0);
}

int
main(void)
{
    char name[64];
    uint32_t nr_mapped = 0;
    pid_t pid;
    int sock;

    snprintf(name, sizeof(name), "api%s", api_form());
    t_init(name);
    t_socket_path(sock_path, sizeof(sock_path), name);
    pid = t_fork(device_child, NULL);
    if (pid < 0) {
        t_fail("fork", "%s", strerror(errno));
        return t_status();
    }
    sock = client_connect(sock_path, CLIENT_TIMEOUT_MS);
    if (sock < 0) {
        t_fail("connect", "%s", strerror(errno));
    } else {
        check_negotiation(sock);
        check_maps(sock, &nr_mapped);
        check_transfer(sock);
        close(sock);
    }
    t_wait_child("device-exit", pid, CLIENT_TIMEOUT_MS);
    unlink(sock_path);
    return t_status();
}
