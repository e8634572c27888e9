/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * The emulated PCI device that most device-core tests serve: a server-side
 * user of the libvfio-user API, run in a forked child.
 *
 *   BAR0  memory, 32-bit, 16 KiB, callback-backed, with two sparse mmap
 *         areas (0x1000-0x1fff and 0x3000-0x3fff) in a memfd at file offset
 *         DEV_BAR0_FILE_OFFSET
 *   BAR1  I/O, 256 bytes, callback-backed; some offsets behave specially
 *         (see DEV_BAR1_*)
 *   BAR2  memory, 64-bit, prefetchable, 64 KiB, callback-backed
 *   caps  power management, then MSI-X (4 vectors, table in BAR0)
 *   irqs  INTx 1, MSI-X 4
 */

#ifndef VFU_DEVICE_TEST_DEVICE_H
#define VFU_DEVICE_TEST_DEVICE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include <vfio-user/libvfio-user.h>

#define DEV_VID      0x4e58
#define DEV_DID      0x0b1d
#define DEV_SSVID    0x1af4
#define DEV_SSID     0x1100
#define DEV_CLASS    0x05
#define DEV_SUBCLASS 0x80
#define DEV_PROGIF   0x01

#define DEV_BAR0_SIZE        0x4000u
#define DEV_BAR0_FILE_OFFSET 0x8000u
#define DEV_BAR0_FILE_SIZE   (DEV_BAR0_FILE_OFFSET + DEV_BAR0_SIZE)
#define DEV_BAR1_SIZE        0x100u
#define DEV_BAR2_SIZE        0x10000u

/* BAR1: a 4-byte access at this offset fails with EIO. */
#define DEV_BAR1_EIO_OFF      0xf0u
/* BAR1: a 4-byte access here is answered short (3 bytes). */
#define DEV_BAR1_SHORT_OFF    0xf4u
/* BAR1: a 4-byte read here returns the server's open fd count. */
#define DEV_BAR1_FDCOUNT_OFF  0xf8u
/*
 * BAR1: a 4-byte read here returns how many times reset was called; a
 * 4-byte write of N makes the next N VFU_RESET_DEVICE resets fail (EIO).
 */
#define DEV_BAR1_RESETS_OFF   0xfcu
/*
 * BAR1: four little-endian u16 the server stores after realize:
 * vfu_pci_find_capability(PM), vfu_pci_find_capability(MSIX),
 * vfu_pci_find_next_capability(from PM, MSIX),
 * vfu_pci_find_next_capability(from MSIX, MSIX).
 */
#define DEV_BAR1_CAPS_OFF     0x80u

#define DEV_MSIX_VECTORS 4
#define DEV_MSIX_TABLE_OFF 0x1000u
#define DEV_MSIX_PBA_OFF   0x3000u

#define DEV_MAX_RESETS 16

struct test_device {
    vfu_ctx_t *ctx;
    int memfd;
    uint8_t bar0[DEV_BAR0_SIZE];
    uint8_t bar1[DEV_BAR1_SIZE];
    uint8_t *bar2;
    ssize_t pm_pos;
    ssize_t msix_pos;
    /* Reset callback arguments, in call order. */
    int resets[DEV_MAX_RESETS];
    size_t nr_resets;
    /* Reset callback calls whose ctx or private pointer were wrong. */
    int reset_bad_ctx;
    /* If > 0, that many upcoming DEVICE resets fail with EIO. */
    int fail_resets;
    /* Region callback calls: total, and those with a wrong ctx. */
    unsigned long accesses;
    unsigned long bad_ctx;
};

/*
 * Creates, configures and realizes the device on a blocking socket context
 * at `path`. memfd backs BAR0 (the caller keeps owning it). Records one
 * check ("device-setup") and returns 0 on success, -1 otherwise.
 */
int device_setup(struct test_device *d, const char *path, int memfd);

/*
 * Attaches one client and serves it until vfu_run_ctx() fails. Returns -1
 * with errno set to the reason the loop ended (ENOTCONN when the client
 * went away), or -2 if vfu_attach_ctx() failed (errno set).
 */
int device_serve_one(struct test_device *d);

/* Destroys the context and frees the device's memory. */
void device_destroy(struct test_device *d);

/* Creates a memfd of DEV_BAR0_FILE_SIZE bytes for BAR0; -1 on error. */
int device_make_memfd(void);

/* What the server child of a device test gets: the socket path and the
 * BAR0 memfd. */
struct device_server_args {
    const char *path;
    int memfd;
};

/*
 * The common start of a device test: t_init(name), a socket path named
 * after the test in path (len bytes), the BAR0 memfd in args->memfd, and a
 * child forked to run server(args). Returns the child's pid, or -1 after
 * reporting what failed.
 */
pid_t device_test_start(const char *name, char *path, size_t len,
                        struct device_server_args *args, void (*server)(void *));

/*
 * A server child for device_test_start(): sets the device up on args (a
 * struct device_server_args), serves one client, checks that the run ends
 * with ENOTCONN when the client leaves, and destroys the device.
 */
void device_serve_one_client(void *args);

/* Optional log callback printing to stderr (when VFU_TEST_LOG is set). */
void device_log(vfu_ctx_t *ctx, int level, const char *msg);

#endif /* VFU_DEVICE_TEST_DEVICE_H */
