/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * What a *binary* built against the 2025 header gets: it calls the exported
 * vfu_setup_device_dma with three arguments (ctx, dma_register,
 * dma_unregister), so the library reads the register callback as
 * max_regions. The library must refuse such a call with EINVAL and a log
 * line, never take the callback for a count and never call anything it
 * was given. Calls with the current four arguments must keep working.
 *
 * This file does not include our header: it declares the few functions it
 * needs itself, the 2025 prototype under another C name bound to the same
 * symbol (so one program can make both kinds of call, linked statically
 * or dynamically).
 */

#include <errno.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef struct vfu_ctx vfu_ctx_t;
typedef struct vfu_dma_info vfu_dma_info_t;
typedef void (vfu_dma_cb_t)(vfu_ctx_t *ctx, vfu_dma_info_t *info);
typedef void (vfu_log_fn_t)(vfu_ctx_t *ctx, int level, const char *msg);

/* Values of the public header (VFU_TRANS_SOCK, VFU_DEV_TYPE_PCI, LOG_DEBUG,
 * LIBVFIO_USER_MAX_DMA_REGIONS). */
#define TRANS_SOCK 0
#define DEV_TYPE_PCI 0
#define LEVEL_DEBUG 7
#define MAX_DMA_REGIONS_2026 (1000 * 1000)

vfu_ctx_t *vfu_create_ctx(int trans, const char *path, int flags, void *pvt,
                          int dev_type);
void vfu_destroy_ctx(vfu_ctx_t *ctx);
int vfu_setup_log(vfu_ctx_t *ctx, vfu_log_fn_t *log, int level);
int vfu_setup_device_dma(vfu_ctx_t *ctx, size_t max_regions,
                         vfu_dma_cb_t *dma_register, vfu_dma_cb_t *dma_unregister);
/* The 2025 prototype, bound to the same symbol. */
int vfu_setup_device_dma_2025(vfu_ctx_t *ctx, vfu_dma_cb_t *dma_register,
                              vfu_dma_cb_t *dma_unregister)
    __asm__("vfu_setup_device_dma");

static int failures;
static int callbacks;
static char last_log[512];

static void
check(const char *name, int cond, const char *why)
{
    printf("%s abi2025/%s%s%s\n", cond ? "ok" : "FAIL", name, cond ? "" : ": ",
           cond ? "" : why);
    if (!cond) {
        failures++;
    }
}

static void
dma_cb(vfu_ctx_t *ctx, vfu_dma_info_t *info)
{
    (void)ctx;
    (void)info;
    callbacks++;
}

static void
log_cb(vfu_ctx_t *ctx, int level, const char *msg)
{
    (void)ctx;
    (void)level;
    snprintf(last_log, sizeof(last_log), "%s", msg);
    if (getenv("VFU_TEST_LOG") != NULL) {
        fprintf(stderr, "libvfio-user[%d]: %s\n", level, msg);
    }
}

static vfu_ctx_t *
new_ctx(const char *tag)
{
    char path[108];
    vfu_ctx_t *ctx;

    snprintf(path, sizeof(path), "/tmp/vfu-abi2025-%s-%ld.sock", tag, (long)getpid());
    ctx = vfu_create_ctx(TRANS_SOCK, path, 0, NULL, DEV_TYPE_PCI);
    if (ctx == NULL) {
        printf("FAIL abi2025/%s: vfu_create_ctx: %s\n", tag, strerror(errno));
        exit(1);
    }
    if (vfu_setup_log(ctx, log_cb, LEVEL_DEBUG) != 0) {
        printf("FAIL abi2025/%s: vfu_setup_log: %s\n", tag, strerror(errno));
        exit(1);
    }
    last_log[0] = '\0';
    return ctx;
}

int
main(void)
{
    vfu_ctx_t *ctx;
    int r, e;

    setvbuf(stdout, NULL, _IOLBF, 0);

    /* The 2025 call with the device's own callbacks (as SPDK makes it). */
    ctx = new_ctx("old-own");
    errno = 0;
    r = vfu_setup_device_dma_2025(ctx, dma_cb, dma_cb);
    e = errno;
    check("old-call-refused", r == -1 && e == EINVAL,
          "a 3-argument call did not fail with EINVAL");
    check("old-call-logged", strstr(last_log, "2025") != NULL,
          "no log line naming the 2025 signature");
    /* The context is still usable: the current call works after it. */
    check("new-call-after-refusal",
          vfu_setup_device_dma(ctx, 64, dma_cb, dma_cb) == 0,
          "the 4-argument call failed after a refused 3-argument one");
    vfu_destroy_ctx(ctx);

    /* A callback that lives in another loaded object (libc). */
    ctx = new_ctx("old-libc");
    errno = 0;
    r = vfu_setup_device_dma_2025(ctx, (vfu_dma_cb_t *)(void (*)(void))abort, NULL);
    e = errno;
    check("old-call-libc-callback-refused", r == -1 && e == EINVAL,
          "a 3-argument call with a libc function did not fail with EINVAL");
    vfu_destroy_ctx(ctx);

    /* A NULL register callback reads as max_regions 0: accepted, like
     * upstream accepts 0, and warned about. */
    ctx = new_ctx("old-null");
    r = vfu_setup_device_dma_2025(ctx, NULL, dma_cb);
    check("old-call-null-register-accepted", r == 0,
          "max_regions 0 was refused");
    check("old-call-null-register-warned", strstr(last_log, "max_regions is 0") != NULL,
          "no warning about max_regions 0");
    vfu_destroy_ctx(ctx);

    /* The current calls. */
    ctx = new_ctx("new-default");
    check("new-call-default-limit",
          vfu_setup_device_dma(ctx, MAX_DMA_REGIONS_2026, dma_cb, dma_cb) == 0,
          "LIBVFIO_USER_MAX_DMA_REGIONS was refused");
    check("new-call-no-log", last_log[0] == '\0', last_log);
    vfu_destroy_ctx(ctx);

    ctx = new_ctx("new-64");
    check("new-call-64", vfu_setup_device_dma(ctx, 64, NULL, NULL) == 0,
          "64 regions were refused");
    vfu_destroy_ctx(ctx);

    check("no-callback-called", callbacks == 0, "a DMA callback was called");
    printf("%d failed\n", failures);
    return failures != 0;
}
