/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * The test device written against the current API: vfu_setup_device_dma()
 * with a region limit, vfu_sgl_read() and vfu_sgl_write() with flags. Built
 * as C and as C++ with -Wall -Wextra -Werror; the calls must reach the
 * exported functions unchanged (flags included), and taking the address of
 * those functions must still work beside the 2025-form macros.
 */

#ifdef VFU_API_QUOTED_INCLUDE
#include "libvfio-user.h"
#else
#include <vfio-user/libvfio-user.h>
#endif

#include "device_common.h"

const char *
api_form(void)
{
    return "2026";
}

uint64_t
api_expected_max_dma_maps(void)
{
    return LIBVFIO_USER_MAX_DMA_REGIONS;
}

/* Function pointers with the exported signatures. */
static int (*const setup_dma_fn)(vfu_ctx_t *, size_t, vfu_dma_register_cb_t *,
                                 vfu_dma_unregister_cb_t *) = vfu_setup_device_dma;
static int (*const sgl_read_fn)(vfu_ctx_t *, dma_sg_t *, size_t, void *,
                                int) = &vfu_sgl_read;

static int
form_setup_dma(vfu_ctx_t *ctx)
{
    if (vfu_setup_device_dma(ctx, LIBVFIO_USER_MAX_DMA_REGIONS,
                             dma_register_cb, dma_unregister_cb) != 0) {
        return -1;
    }
    /* Through the pointer: the same function (DMA is set up already). */
    if (setup_dma_fn(ctx, 64, dma_register_cb, dma_unregister_cb) != -1 ||
        errno != EEXIST) {
        fprintf(stderr, "second vfu_setup_device_dma did not fail with EEXIST\n");
        return -1;
    }
    return 0;
}

static int
form_transfer(vfu_ctx_t *ctx, dma_sg_t *sg, uint8_t *buf)
{
    size_t i;

    /* Flags reach the library: an unknown one is refused. */
    if (vfu_sgl_read(ctx, sg, 1, buf, 0x80) != -1 || errno != EINVAL) {
        return 1;
    }
    /* Direct access falls back to the socket: the region has no fd. */
    if (sgl_read_fn(ctx, sg, 1, buf, VFU_SGL_DIRECT_ACCESS) != 0) {
        return 2;
    }
    for (i = 0; i < API_XFER_LEN; i++) {
        buf[i] = (uint8_t)~buf[i];
    }
    if (vfu_sgl_write(ctx, sg, 1, buf, 0) != 0) {
        return 3;
    }
    return 0;
}
