/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * The test device written against the 2025 API (the form SPDK master still
 * uses): vfu_setup_device_dma() without a region limit, vfu_sgl_read() and
 * vfu_sgl_write() without flags. It must build unchanged against our
 * header, as C and as C++, with -Wall -Wextra -Werror, and behave as the
 * 2025 library did: 64 DMA regions at most, and transfers through the
 * client socket.
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
    return "2025";
}

uint64_t
api_expected_max_dma_maps(void)
{
    /* The region limit the 2025 library had built in. */
    return 64;
}

static int
form_setup_dma(vfu_ctx_t *ctx)
{
    return vfu_setup_device_dma(ctx, dma_register_cb, dma_unregister_cb);
}

static int
form_transfer(vfu_ctx_t *ctx, dma_sg_t *sg, uint8_t *buf)
{
    size_t i;

    /* The 2025 library served exactly one entry per call. */
    if (vfu_sgl_read(ctx, sg, 2, buf) != -1 || errno != ENOTSUP) {
        return 1;
    }
    if (vfu_sgl_read(ctx, sg, 1, buf) != 0) {
        return 2;
    }
    for (i = 0; i < API_XFER_LEN; i++) {
        buf[i] = (uint8_t)~buf[i];
    }
    if (vfu_sgl_write(ctx, sg, 1, buf) != 0) {
        return 3;
    }
    return 0;
}
