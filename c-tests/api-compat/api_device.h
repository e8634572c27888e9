/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * The interface between driver.c (the client side, always C) and the
 * device side, which exists twice: api2025.c calls the library in the
 * 2025 API form, api2026.c in the current form. Each device file is built
 * as C and as C++.
 *
 * The device has one region, BAR0 (API_BAR0_SIZE bytes):
 *
 *   write 8 bytes at API_OFF_DMA     a guest address A: the device reads 16
 *                                    bytes at A with vfu_sgl_read, inverts
 *                                    every bit and writes them back at A
 *                                    with vfu_sgl_write (both through the
 *                                    client socket, as the region mapped at
 *                                    A has no fd); the write's reply comes
 *                                    after both transfers
 *   read 4 bytes at API_OFF_NREG     dma_register callbacks seen so far
 *   read 4 bytes at API_OFF_STATUS   0, or the number of the first step of
 *                                    the transfer test that went wrong
 *   read 4 bytes at API_OFF_ERRNO    errno seen at that step
 */

#ifndef VFU_API_DEVICE_H
#define VFU_API_DEVICE_H

#include <stddef.h>
#include <stdint.h>

#define API_BAR0_SIZE   0x100u
#define API_OFF_DMA     0x00u
#define API_OFF_NREG    0x08u
#define API_OFF_STATUS  0x10u
#define API_OFF_ERRNO   0x14u
#define API_XFER_LEN    16u

#ifdef __cplusplus
extern "C" {
#endif

/* "2025" or "2026". */
const char *api_form(void);

/* The max_regions the device's vfu_setup_device_dma call stands for. */
uint64_t api_expected_max_dma_maps(void);

/*
 * Serves one client on the socket at path, until it disconnects. Returns 0
 * if every library call gave what the form promises, else non-zero (after
 * printing why on stderr).
 */
int api_device_main(const char *path);

#ifdef __cplusplus
}
#endif

#endif /* VFU_API_DEVICE_H */
