/*
 * cpushare_rt.c - the C runtime linked into every CPUShare bytecode image.
 *
 * The out-of-line mem* and str* functions that cpushare.h declares.  gcc
 * may call memcpy, memset, memmove and memcmp even in freestanding code
 * (struct copies, zeroed arrays), so they must exist.  `cpushare cc`
 * compiles this file with -fno-tree-loop-distribute-patterns so that gcc
 * does not turn these loops back into calls to themselves.  They are weak:
 * a buyer's own definition of any of them takes precedence.
 */
#include "cpushare.h"

__attribute__((weak)) void *memcpy(void *dst, const void *src, size_t n)
{
    void *d = dst;
    __asm__ volatile ("rep movsb" : "+D"(d), "+S"(src), "+c"(n) : : "memory");
    return dst;
}

__attribute__((weak)) void *memset(void *dst, int c, size_t n)
{
    void *d = dst;
    __asm__ volatile ("rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
    return dst;
}

__attribute__((weak)) void *memmove(void *dst, const void *src, size_t n)
{
    unsigned char *d = dst;
    const unsigned char *s = src;
    if (d == s || n == 0)
        return dst;
    if (d < s || d >= s + n)
        return memcpy(dst, src, n);
    while (n--)
        d[n] = s[n];
    return dst;
}

__attribute__((weak)) int memcmp(const void *a, const void *b, size_t n)
{
    const unsigned char *p = a, *q = b;
    for (size_t i = 0; i < n; i++)
        if (p[i] != q[i])
            return p[i] - q[i];
    return 0;
}

__attribute__((weak)) size_t strlen(const char *s)
{
    const char *p = s;
    while (*p)
        p++;
    return (size_t)(p - s);
}

__attribute__((weak)) int strcmp(const char *a, const char *b)
{
    const unsigned char *p = (const unsigned char *)a, *q = (const unsigned char *)b;
    while (*p && *p == *q)
        p++, q++;
    return *p - *q;
}
