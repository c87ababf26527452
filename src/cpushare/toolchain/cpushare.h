/*
 * cpushare.h - the runtime of a CPUShare bytecode job.
 *
 * A job runs under seccomp strict mode: the only system calls it may make
 * are read(2), write(2) and exit(2) (and rt_sigreturn, which it never needs).
 * Its input is file descriptor 0, its output file descriptor 1; every other
 * descriptor is closed.  There is no heap, no clock and no libc: the job's
 * memory is exactly its text, data, bss and stack, fixed when it starts.
 *
 * A job is C with
 *
 *     int main(void);
 *
 * whose return value is the job's exit status (0..255).  `cpushare cc`
 * compiles it freestanding and links it with the project's crt0, which
 * calls main and then the raw exit system call (never exit_group, which
 * strict mode kills).
 *
 * This header provides:
 *
 *   cs_read, cs_write        one raw system call; return bytes moved or -errno
 *   cs_exit                  end the job now with a status
 *   cs_read_exact            read exactly n bytes; n, or -1 on EOF or error
 *   cs_write_all             write all n bytes; n, or -1 on error
 *   cs_recv_msg, cs_send_msg length-prefixed messages on fd 0 / fd 1:
 *                            a u32 little-endian length, then that many bytes
 *   memcpy, memset, memmove, memcmp, strlen, strcmp
 *                            the usual meanings, defined in the runtime that
 *                            `cpushare cc` links into every image (gcc may
 *                            emit calls to the mem* ones on its own)
 *
 * The system call wrappers also work in an ordinary Linux process, so the
 * same source can be compiled natively (with libc) for testing and timing.
 */
#ifndef CPUSHARE_H
#define CPUSHARE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define CS_STDIN  0
#define CS_STDOUT 1

#define CS_SYS_READ  0
#define CS_SYS_WRITE 1
#define CS_SYS_EXIT  60 /* exit, not exit_group (231): strict mode allows only exit */

#define CS_EINTR 4

/* The mem/str basics.  In an image they come from the runtime linked by
 * `cpushare cc`; in a native build, from libc. */
void *memcpy(void *dst, const void *src, size_t n);
void *memset(void *dst, int c, size_t n);
void *memmove(void *dst, const void *src, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
int strcmp(const char *a, const char *b);

static inline long cs_syscall3(long nr, long a0, long a1, long a2)
{
    long ret;
    __asm__ volatile ("syscall"
                      : "=a"(ret)
                      : "a"(nr), "D"(a0), "S"(a1), "d"(a2)
                      : "rcx", "r11", "memory");
    return ret;
}

/* read(2) on fd: bytes read (0 at end of input) or -errno. */
static inline long cs_read(int fd, void *buf, size_t n)
{
    return cs_syscall3(CS_SYS_READ, fd, (long)buf, (long)n);
}

/* write(2) on fd: bytes written or -errno. */
static inline long cs_write(int fd, const void *buf, size_t n)
{
    return cs_syscall3(CS_SYS_WRITE, fd, (long)buf, (long)n);
}

/* End the job with status & 0xff.  Does not return. */
static inline __attribute__((noreturn)) void cs_exit(int status)
{
    for (;;)
        cs_syscall3(CS_SYS_EXIT, status, 0, 0);
}

/* Read exactly n bytes into buf: n, or -1 on end of input or error
 * (what was read before is in buf, but how much is not reported). */
static inline long cs_read_exact(int fd, void *buf, size_t n)
{
    size_t done = 0;
    while (done < n) {
        long r = cs_read(fd, (char *)buf + done, n - done);
        if (r == -CS_EINTR)
            continue;
        if (r <= 0)
            return -1;
        done += (size_t)r;
    }
    return (long)n;
}

/* Write all n bytes of buf: n, or -1 on error. */
static inline long cs_write_all(int fd, const void *buf, size_t n)
{
    size_t done = 0;
    while (done < n) {
        long r = cs_write(fd, (const char *)buf + done, n - done);
        if (r == -CS_EINTR)
            continue;
        if (r <= 0)
            return -1;
        done += (size_t)r;
    }
    return (long)n;
}

/* Receive one message from fd 0 into buf (at most max bytes): its length,
 * -1 on end of input or error, -2 when the message is longer than max (its
 * body is then left unread, so the stream cannot be resumed). */
static inline long cs_recv_msg(void *buf, size_t max)
{
    unsigned char h[4];
    uint32_t len;
    if (cs_read_exact(CS_STDIN, h, 4) < 0)
        return -1;
    len = (uint32_t)h[0] | (uint32_t)h[1] << 8 | (uint32_t)h[2] << 16 | (uint32_t)h[3] << 24;
    if (len > max)
        return -2;
    if (cs_read_exact(CS_STDIN, buf, len) < 0)
        return -1;
    return (long)len;
}

/* Send one message of len bytes to fd 1: 0, or -1 on error (or when len
 * does not fit in 32 bits). */
static inline long cs_send_msg(const void *buf, size_t len)
{
    unsigned char h[4];
    if (len > 0xffffffffu)
        return -1;
    h[0] = (unsigned char)len;
    h[1] = (unsigned char)(len >> 8);
    h[2] = (unsigned char)(len >> 16);
    h[3] = (unsigned char)(len >> 24);
    if (cs_write_all(CS_STDOUT, h, 4) < 0 || cs_write_all(CS_STDOUT, buf, len) < 0)
        return -1;
    return 0;
}

#ifdef __cplusplus
}
#endif

#endif /* CPUSHARE_H */
