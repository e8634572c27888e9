/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * Shared helpers for the device-core C tests:
 *
 *  - result reporting: every check prints "ok NAME" or "FAIL NAME: why" on
 *    stdout, and a process exits non-zero if any of its checks failed;
 *  - process plumbing: a test forks a server child that drives the library,
 *    while the parent acts as a vfio-user client;
 *  - a deliberately small raw vfio-user client that builds messages byte by
 *    byte, so that malformed requests can be sent as easily as valid ones.
 */

#ifndef VFU_DEVICE_TEST_CLIENT_H
#define VFU_DEVICE_TEST_CLIENT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include <vfio-user/libvfio-user.h>

/* Most fds a reply may carry that the client keeps. */
#define CLIENT_MAX_FDS 16

/* Default per-call timeout of the client, in milliseconds. */
#define CLIENT_TIMEOUT_MS 10000

/* ------------------------------------------------------------------------ */
/* Reporting                                                                */
/* ------------------------------------------------------------------------ */

/* Number of failed checks in this process. */
extern int t_failures;

/* Starts a test program: line-buffered stdout and a watchdog alarm. */
void t_init(const char *program);

/* Records a passing check. */
void t_ok(const char *name);

/* Records a failing check; the rest is a printf-style explanation. */
void t_fail(const char *name, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* Records a check that passes iff cond is true. Returns cond. */
bool t_check(const char *name, bool cond, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Passes iff got == want; the failure message shows both in hex. */
bool t_check_u64(const char *name, uint64_t got, uint64_t want);

/*
 * Passes iff ret == -1 and errno (sampled by the caller right after the call
 * into the library) equals want_errno.
 */
bool t_check_err(const char *name, long ret, int err, int want_errno);

/* Exit status for this process: 0 iff no check failed. */
int t_status(void);

/* ------------------------------------------------------------------------ */
/* Processes                                                                */
/* ------------------------------------------------------------------------ */

/* Builds a unique socket path under /tmp for this test program. */
void t_socket_path(char *buf, size_t len, const char *tag);

/*
 * Forks; the child runs fn(arg) and exits with t_status() (through exit(),
 * so that stdio is flushed and memory checkers see a normal exit). Returns
 * the child's pid in the parent, or -1 on error.
 */
pid_t t_fork(void (*fn)(void *arg), void *arg);

/*
 * Waits (at most timeout_ms) for a child forked by t_fork() and records a
 * check named NAME that passes iff it exited with status 0. If it does not
 * exit in time it is killed.
 */
bool t_wait_child(const char *name, pid_t pid, int timeout_ms);

/* Number of open file descriptors of the calling process. */
int t_count_fds(void);

/* ------------------------------------------------------------------------ */
/* Raw vfio-user client                                                     */
/* ------------------------------------------------------------------------ */

/* A received message: header, body (msg_size - 16 bytes) and fds. */
struct reply {
    struct vfio_user_header hdr;
    uint8_t *body;
    size_t len;
    int fds[CLIENT_MAX_FDS];
    size_t nr_fds;
};

/* Connects to a server socket, retrying until it exists and accepts. */
int client_connect(const char *path, int timeout_ms);

/*
 * Sends one message: the header exactly as given (msg_size is not touched,
 * so it may lie about the length), then `len` body bytes. `fds` are passed
 * with SCM_RIGHTS on the first byte. Returns 0 or -1 (errno set).
 */
int client_send_raw(int sock, const struct vfio_user_header *hdr,
                    const void *body, size_t len,
                    const int *fds, size_t nr_fds);

/* Sends a command whose msg_size is 16 + len. Returns 0 or -1. */
int client_send(int sock, uint16_t msg_id, uint16_t cmd, uint32_t flags,
                const void *body, size_t len, const int *fds, size_t nr_fds);

/*
 * Receives one message (header, then the body announced by msg_size, and
 * any fds). Returns 0, or -1 with errno set (ETIMEDOUT, ECONNRESET when the
 * peer closed the connection, EPROTO for a nonsensical msg_size).
 */
int client_recv(int sock, struct reply *r, int timeout_ms);

/* Frees the body and closes the fds of a reply; it may be reused after. */
void reply_free(struct reply *r);

/*
 * Sends a command with a fresh msg_id and receives its reply. Returns 0 if a
 * reply with the same msg_id and cmd arrived (error replies included), -1
 * otherwise.
 */
int client_call(int sock, uint16_t cmd, const void *body, size_t len,
                const int *fds, size_t nr_fds, struct reply *r);

/* Fresh message id. */
uint16_t client_next_id(void);

/*
 * Performs VERSION negotiation with the given version and JSON (NULL: no
 * JSON at all) and returns the reply in r. Returns 0 if a reply arrived.
 */
int client_version(int sock, uint16_t major, uint16_t minor, const char *json,
                   struct reply *r);

/* Negotiates version 0.2 with a small capabilities object; 0 on success. */
int client_negotiate(int sock);

/* True iff the reply carries F_ERROR with this errno. */
bool reply_is_error(const struct reply *r, int err);

/* True iff the reply is a successful reply (type REPLY, no F_ERROR). */
bool reply_is_ok(const struct reply *r);

/*
 * REGION_READ of `count` bytes; copies the data into `out`. Returns 0 on
 * success, the reply's errno for an error reply, or -1 on transport failure.
 */
int client_region_read(int sock, uint32_t region, uint64_t offset,
                       uint32_t count, void *out);

/* REGION_WRITE; same return convention as client_region_read(). */
int client_region_write(int sock, uint32_t region, uint64_t offset,
                        uint32_t count, const void *data);

/*
 * Looks up an integer member `key` in a JSON text, at any depth, and stores
 * it in *value. Only what the checks need: no escapes in keys.
 */
bool json_get_uint(const char *json, const char *key, uint64_t *value);

#endif /* VFU_DEVICE_TEST_CLIENT_H */
