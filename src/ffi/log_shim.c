/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * vfu_log() is variadic, which Rust cannot define: it is formatted here and
 * handed to Rust through two hooks that Rust installs (from vfu_create_ctx,
 * before any context exists), so the hooks need no exported symbol.
 */

#include <errno.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>

struct vfu_ctx;

typedef bool (*vfu_log_enabled_fn)(struct vfu_ctx *ctx, int level);
typedef void (*vfu_log_message_fn)(struct vfu_ctx *ctx, int level, const char *msg);

static vfu_log_enabled_fn log_enabled;
static vfu_log_message_fn log_message;

__attribute__((visibility("hidden")))
void vfu_log_shim_init(vfu_log_enabled_fn enabled, vfu_log_message_fn message)
{
    __atomic_store_n(&log_enabled, enabled, __ATOMIC_RELEASE);
    __atomic_store_n(&log_message, message, __ATOMIC_RELEASE);
}

__attribute__((visibility("default"), format(printf, 3, 4)))
void vfu_log(struct vfu_ctx *ctx, int level, const char *fmt, ...)
{
    vfu_log_enabled_fn enabled = __atomic_load_n(&log_enabled, __ATOMIC_ACQUIRE);
    vfu_log_message_fn message = __atomic_load_n(&log_message, __ATOMIC_ACQUIRE);
    char buf[BUFSIZ];
    int saved = errno;
    va_list ap;

    if (ctx == NULL || fmt == NULL || enabled == NULL || message == NULL ||
        !enabled(ctx, level)) {
        errno = saved;
        return;
    }
    va_start(ap, fmt);
    vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    message(ctx, level, buf);
    errno = saved;
}
