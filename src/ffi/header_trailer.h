/*
 * Source compatibility with the 2025 API (appended to libvfio-user.h by
 * build.rs, after the generated prototypes).
 *
 * Until September 2025 vfu_setup_device_dma() took no region limit and
 * vfu_sgl_read()/vfu_sgl_write() took no flags:
 *
 *   vfu_setup_device_dma(ctx, dma_register, dma_unregister);
 *   vfu_sgl_read(ctx, sg, cnt, data);
 *   vfu_sgl_write(ctx, sg, cnt, data);
 *
 * The macros below count the arguments of a call. A call in the old form
 * becomes a call of the current function with the values the old library
 * used (64 DMA regions; no flags, so the transfer goes through the client
 * socket as it did then); a call in the current form is passed through
 * unchanged. A function-like macro is not expanded again inside its own
 * replacement, and is not expanded at all where the name is not followed by
 * '(', so the exported symbols keep their current signatures and taking
 * their address still works.
 *
 * Define VFU_NO_2025_API_MACROS before including this header to get the
 * plain prototypes only.
 *
 * Binaries built against a 2025 header are not supported: see
 * docs/api-2025.md.
 */
#if !defined(VFU_NO_2025_API_MACROS) && !defined(VFU_2025_API_MACROS_DEFINED)
#define VFU_2025_API_MACROS_DEFINED 1

/* The fixed DMA region limit of the 2025 library. */
#define VFU_DMA_REGIONS_2025 64

/* Number of arguments of a call with 1 to 6 arguments. */
#define VFU_ARGC_(...) VFU_ARGC_PICK_(__VA_ARGS__, 6, 5, 4, 3, 2, 1, 0)
#define VFU_ARGC_PICK_(a1, a2, a3, a4, a5, a6, n, ...) n
#define VFU_CAT_(a, b) VFU_CAT2_(a, b)
#define VFU_CAT2_(a, b) a##b

#define vfu_setup_device_dma(...) \
    VFU_CAT_(VFU_SETUP_DEVICE_DMA_, VFU_ARGC_(__VA_ARGS__))(__VA_ARGS__)
#define VFU_SETUP_DEVICE_DMA_3(ctx, dma_register, dma_unregister) \
    (vfu_setup_device_dma)((ctx), VFU_DMA_REGIONS_2025, (dma_register), \
                           (dma_unregister))
#define VFU_SETUP_DEVICE_DMA_4(ctx, max_regions, dma_register, dma_unregister) \
    (vfu_setup_device_dma)((ctx), (max_regions), (dma_register), \
                           (dma_unregister))

#define vfu_sgl_read(...) \
    VFU_CAT_(VFU_SGL_READ_, VFU_ARGC_(__VA_ARGS__))(__VA_ARGS__)
#define VFU_SGL_READ_4(ctx, sg, cnt, data) \
    (vfu_sgl_read)((ctx), (sg), (cnt), (data), 0)
#define VFU_SGL_READ_5(ctx, sg, cnt, data, flags) \
    (vfu_sgl_read)((ctx), (sg), (cnt), (data), (flags))

#define vfu_sgl_write(...) \
    VFU_CAT_(VFU_SGL_WRITE_, VFU_ARGC_(__VA_ARGS__))(__VA_ARGS__)
#define VFU_SGL_WRITE_4(ctx, sg, cnt, data) \
    (vfu_sgl_write)((ctx), (sg), (cnt), (data), 0)
#define VFU_SGL_WRITE_5(ctx, sg, cnt, data, flags) \
    (vfu_sgl_write)((ctx), (sg), (cnt), (data), (flags))

#endif /* VFU_2025_API_MACROS_DEFINED */
