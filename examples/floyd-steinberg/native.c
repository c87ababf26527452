/*
 * native.c - run dither.c's very kernel as an ordinary Linux program.
 *
 * Built with the system gcc and libc (see fsjob.build_native), it includes
 * dither.c itself, so the code that runs is the code the sandbox runs.
 *
 *   dither-native            FSD1 messages on stdin, the job's output on
 *                            stdout and its exit status: exactly what
 *                            `cpushare run dither.bin` does
 *   dither-native --batch    any number of FSD1 messages on stdin; for each,
 *                            a u32 exit status, a u32 length and the job's
 *                            output on stdout (used to time the kernel
 *                            natively without a process per image)
 */
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static long native_write(const void *buf, size_t n);

#define FS_NO_MAIN
#define FS_WRITE(buf, n) native_write((buf), (n))
#include "dither.c"

static int capturing;
static uint8_t captured[FS_OUT_HEADER + 24 * FS_MAX_SIGMAS + 2 * FS_MAX_PIXELS + 4];
static size_t captured_len;

static long native_write(const void *buf, size_t n)
{
    if (!capturing)
        return cs_write_all(CS_STDOUT, buf, n);
    if (n > sizeof captured - captured_len)
        return -1;
    memcpy(captured + captured_len, buf, n);
    captured_len += n;
    return (long)n;
}

static int put_u32(uint32_t v)
{
    uint8_t b[4];
    fs_put32(b, v);
    return cs_write_all(CS_STDOUT, b, 4) < 0 ? -1 : 0;
}

int main(int argc, char **argv)
{
    if (argc == 1) {
        int status = fs_process();      /* exactly dither.c's main */
        if (status == FS_EOF)
            return fs_fail(FS_E_INPUT, "no input: expected one FSD1 message", 0, 0);
        while (status == 0)
            if ((status = fs_process()) == FS_EOF)
                return 0;
        return status;
    }
    if (argc != 2 || strcmp(argv[1], "--batch") != 0) {
        fprintf(stderr, "usage: %s [--batch] < FSD1 messages\n", argv[0]);
        return 64;
    }
    capturing = 1;
    for (;;) {
        captured_len = 0;
        int status = fs_process();
        if (status == FS_EOF)
            return 0;
        if (put_u32((uint32_t)status) < 0 || put_u32((uint32_t)captured_len) < 0
            || cs_write_all(CS_STDOUT, captured, captured_len) < 0) {
            fprintf(stderr, "%s: writing the results to stdout failed\n", argv[0]);
            return 1;
        }
        if (status != 0)        /* the input stream cannot be resynchronised */
            return 0;
    }
}
