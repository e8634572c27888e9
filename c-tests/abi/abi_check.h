/* SPDX-License-Identifier: BSD-3-Clause */
/* Check counters and layout-checking macros shared by the ABI tests. */

#ifndef VFU_ABI_CHECK_H
#define VFU_ABI_CHECK_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the bit-field position checks assume a little-endian GCC/Clang target"
#endif

/* ---- type helpers that work in both languages ---- */

#ifdef __cplusplus
#include <type_traits>
/* Subscripted members give T& under decltype; compare the plain type. */
#define TYPEOF(x) std::remove_reference<decltype(x)>::type
#define SAME_TYPE(a, b) (std::is_same<a, b>::value)
#define CXX_ONLY(stmt) stmt
#else
#define TYPEOF(x) __typeof__(x)
#define SAME_TYPE(a, b) __builtin_types_compatible_p(a, b)
#define CXX_ONLY(stmt) do { } while (0)
#endif

#define STR_(x) #x
#define XSTR(x) STR_(x)

/* ---- result bookkeeping ---- */

static unsigned n_passed;
static unsigned n_failed;

static inline void
check_true(const char *what, int ok)
{
    if (ok) {
        n_passed++;
    } else {
        n_failed++;
        printf("FAIL: %s\n", what);
    }
}

static inline void
check_num(const char *what, unsigned long long got, unsigned long long want)
{
    if (got == want) {
        n_passed++;
    } else {
        n_failed++;
        printf("FAIL: %s = %llu (0x%llx), expected %llu (0x%llx)\n",
               what, got, got, want, want);
    }
}

static inline void
check_str(const char *what, const char *got, const char *want)
{
    if (strcmp(got, want) == 0) {
        n_passed++;
    } else {
        n_failed++;
        printf("FAIL: %s expands to \"%s\", expected \"%s\"\n", what, got, want);
    }
}

/*
 * `raw` is an object image after storing all-ones into one bit-field of an
 * otherwise zeroed object. Exactly bits [off, off + width) must be set, and
 * reading the field back must give 2^width - 1.
 */
static inline void
check_bits(const char *what, const unsigned char *raw, size_t len,
           unsigned off, unsigned width, unsigned long long readback)
{
    unsigned char want[256];
    unsigned long long want_rb;
    int ok = 1;
    size_t i;

    if (len > sizeof(want) || off + width > len * 8) {
        ok = 0;
    } else {
        memset(want, 0, sizeof(want));
        for (i = off; i < (size_t)off + width; i++) {
            want[i / 8] |= (unsigned char)(1u << (i % 8));
        }
        ok = memcmp(raw, want, len) == 0;
    }
    want_rb = width >= 64 ? ~0ULL : (1ULL << width) - 1;
    if (readback != want_rb) {
        ok = 0;
    }

    if (ok) {
        n_passed++;
        return;
    }
    n_failed++;
    printf("FAIL: bit-field %s: expected bits %u..%u (width %u), image:",
           what, off, off + width - 1, width);
    for (i = 0; i < len; i++) {
        printf(" %02x", raw[i]);
    }
    printf(", read back 0x%llx\n", readback);
}

static volatile unsigned long long all_ones __attribute__((unused)) = ~0ULL;

/* ---- check macros ---- */

/* A macro that is defined (possibly empty). */
#define IS_MACRO(m) \
    check_true(#m " is defined as a macro", strcmp(#m, XSTR(m)) != 0)

/*
 * A macro with a given numeric value. (Each macro below stringifies `m`
 * itself: handing `m` on to another macro would expand it first.)
 */
#define MACRO_V(m, value) do { \
    check_true(#m " is defined as a macro", strcmp(#m, XSTR(m)) != 0); \
    check_num(#m, (unsigned long long)(m), (value)); \
} while (0)

/* As MACRO_V, and the replacement list must be spelled exactly so. */
#define MACRO_S(m, value, spelling) do { \
    check_true(#m " is defined as a macro", strcmp(#m, XSTR(m)) != 0); \
    check_num(#m, (unsigned long long)(m), (value)); \
    check_str(#m, XSTR(m), spelling); \
} while (0)

/* An enumeration constant (not a macro) of the given enum type. */
#define ENUM_C(e, value, etype) do { \
    check_true(#e " is an enumerator, not a macro", strcmp(#e, XSTR(e)) == 0); \
    check_num(#e, (unsigned long long)(e), (value)); \
    CXX_ONLY(check_true("type of " #e " is " #etype, \
                        SAME_TYPE(TYPEOF(e), etype))); \
} while (0)

#define SIZE(T, n)  check_num("sizeof(" #T ")", sizeof(T), (n))
#define ALIGN(T, n) check_num("alignof(" #T ")", __alignof__(T), (n))
#define SIZE_ALIGN(T, n, a) do { SIZE(T, n); ALIGN(T, a); } while (0)

/* Ordinary member: offset, size and exact declared type. */
#define MEMBER(T, f, off, type) do { \
    check_num("offsetof(" #T ", " #f ")", offsetof(T, f), (off)); \
    check_num("sizeof(" #T "::" #f ")", sizeof(((T *)0)->f), sizeof(type)); \
    check_true("type of " #T "::" #f " is " #type, \
               SAME_TYPE(TYPEOF(((T *)0)->f), type)); \
} while (0)

/* Member whose type has no name (anonymous struct/union member). */
#define MEMBER_AT(T, f, off, size) do { \
    check_num("offsetof(" #T ", " #f ")", offsetof(T, f), (off)); \
    check_num("sizeof(" #T "::" #f ")", sizeof(((T *)0)->f), (size)); \
} while (0)

/* Flexible array member: offset and element type. */
#define FLEX(T, f, off, elem) do { \
    check_num("offsetof(" #T ", " #f ")", offsetof(T, f), (off)); \
    check_true("type of " #T "::" #f " is " #elem "[]", \
               SAME_TYPE(TYPEOF(((T *)0)->f), elem[])); \
} while (0)

/* Bit-field: exact bit position/width; declared type checked in C++. */
#define BITS(T, f, off, width, type) do { \
    T v_; \
    unsigned char raw_[sizeof(T)]; \
    memset(&v_, 0, sizeof(v_)); \
    v_.f = all_ones; \
    memcpy(raw_, &v_, sizeof(raw_)); \
    check_bits(#T "::" #f, raw_, sizeof(raw_), (off), (width), \
               (unsigned long long)v_.f); \
    CXX_ONLY(check_true("declared type of bit-field " #T "::" #f " is " #type, \
                        SAME_TYPE(TYPEOF(((T *)0)->f), type))); \
} while (0)

#define TYPEDEF_OF(td, T) \
    check_true(#td " names " #T, SAME_TYPE(td, T))

/* Prints the summary line; returns the process exit status. */
static inline int
abi_summary(void)
{
    printf("%u passed, %u failed\n", n_passed, n_failed);
    return n_failed == 0 ? 0 : 1;
}

#endif /* VFU_ABI_CHECK_H */
