/*
 * A minimal libvfio-user consumer, used to check that the installed headers,
 * libraries, pkg-config module and CMake package work for C (and C++) code.
 *
 * It creates a non-blocking socket context for a PCI device, initialises the
 * PCI config space, sets the IDs, realizes the context and checks that the
 * IDs appear at the right offsets of the config space. Prints "ok" on success.
 *
 * Usage: consumer [SOCKET_PATH]
 *
 * Define VFU_CONSUMER_QUOTED_INCLUDE to include the header as
 * "libvfio-user.h" (needs <includedir>/vfio-user on the include path) rather
 * than <vfio-user/libvfio-user.h>.
 */

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#ifdef VFU_CONSUMER_QUOTED_INCLUDE
#include "libvfio-user.h"
#else
#include <vfio-user/libvfio-user.h>
#endif

enum {
    TEST_VID = 0x1234,
    TEST_DID = 0x5678,
    TEST_SSVID = 0x9abc,
    TEST_SSID = 0xdef0,
};

static int
check_u16(const uint8_t *cfg, size_t off, unsigned int want, const char *what)
{
    unsigned int got = (unsigned int)cfg[off] | ((unsigned int)cfg[off + 1] << 8);

    if (got != want) {
        fprintf(stderr, "%s at config offset %#zx: got %#06x, want %#06x\n",
                what, off, got, want);
        return -1;
    }
    return 0;
}

int
main(int argc, char *argv[])
{
    static int private_token;
    char default_path[256];
    const char *path;
    vfu_ctx_t *ctx;
    const vfu_pci_config_space_t *cfg;
    const uint8_t *raw;
    int failed = 0;

    if (argc > 1) {
        path = argv[1];
    } else {
        snprintf(default_path, sizeof(default_path),
                 "/tmp/vfu-consumer.%ld.sock", (long)getpid());
        path = default_path;
    }
    (void)unlink(path);

    ctx = vfu_create_ctx(VFU_TRANS_SOCK, path, LIBVFIO_USER_FLAG_ATTACH_NB,
                         &private_token, VFU_DEV_TYPE_PCI);
    if (ctx == NULL) {
        fprintf(stderr, "vfu_create_ctx(%s): %s\n", path, strerror(errno));
        return 1;
    }

    if (vfu_get_private(ctx) != &private_token) {
        fprintf(stderr, "vfu_get_private returned the wrong pointer\n");
        failed = 1;
        goto out;
    }

    if (vfu_pci_init(ctx, VFU_PCI_TYPE_CONVENTIONAL, PCI_HEADER_TYPE_NORMAL,
                     0) < 0) {
        fprintf(stderr, "vfu_pci_init: %s\n", strerror(errno));
        failed = 1;
        goto out;
    }

    vfu_pci_set_id(ctx, TEST_VID, TEST_DID, TEST_SSVID, TEST_SSID);

    if (vfu_realize_ctx(ctx) < 0) {
        fprintf(stderr, "vfu_realize_ctx: %s\n", strerror(errno));
        failed = 1;
        goto out;
    }

    cfg = vfu_pci_get_config_space(ctx);
    if (cfg == NULL) {
        fprintf(stderr, "vfu_pci_get_config_space returned NULL\n");
        failed = 1;
        goto out;
    }

    /* Raw little-endian bytes at the offsets the PCI spec defines... */
    raw = (const uint8_t *)cfg;
    if (check_u16(raw, 0x00, TEST_VID, "vendor ID") < 0 ||
        check_u16(raw, 0x02, TEST_DID, "device ID") < 0 ||
        check_u16(raw, 0x2c, TEST_SSVID, "subsystem vendor ID") < 0 ||
        check_u16(raw, 0x2e, TEST_SSID, "subsystem ID") < 0) {
        failed = 1;
        goto out;
    }

    /* ...and the same fields through the header's structure layout. */
    if (cfg->hdr.id.vid != TEST_VID || cfg->hdr.id.did != TEST_DID ||
        cfg->hdr.ss.vid != TEST_SSVID || cfg->hdr.ss.sid != TEST_SSID) {
        fprintf(stderr, "vfu_pci_hdr_t fields disagree with the raw bytes\n");
        failed = 1;
        goto out;
    }

out:
    vfu_destroy_ctx(ctx);
    (void)unlink(path);
    if (failed) {
        return 1;
    }
    printf("ok\n");
    return 0;
}
