/*
 * dither.c - the Floyd-Steinberg study's job.
 *
 * One grayscale image in, Floyd-Steinberg error diffusion with a raster
 * scan and with a serpentine scan, and for each scan how close the
 * dithered image looks to the original: the squared error between the two
 * after a Gaussian blur, at a few blur widths.  Everything is integer
 * arithmetic except the Gaussian weights, which are computed here once per
 * blur width with plain IEEE double operations (no libm) and then rounded
 * to integers, so that this job gives the same bytes wherever it runs:
 * in the sandbox, natively (native.c), on any seller.
 *
 * Input: one message (a u32 little-endian length, then that many bytes):
 *
 *   offset  size  field
 *        0     4  magic "FSD1"
 *        4     2  width  (1..1024)
 *        6     2  height (1..1024)
 *        8     1  flags: bit 0 = also return both dithered images
 *        9     1  number of blur widths (0..6)
 *       10     2  reserved, 0
 *       12    12  six u16 blur widths (sigma) in 1/16 pixel, 0..256;
 *                 sigma 0 means no blur; unused slots are 0
 *       24   w*h  the pixels, 8-bit gray, row after row
 *
 * Output on success (exit status 0): one message whose body is
 *
 *        0     4  magic "FSR1"
 *        4     2  width, 6 2 height, 8 1 flags, 9 1 number of blur widths
 *       10     2  reserved, 0
 *       12     4  number of pixels
 *       16     8  sum of the original's pixel values
 *       24     8  white pixels (255) in the raster-scan result
 *       32     8  white pixels in the serpentine-scan result
 *       40     8  pixels where the two results differ
 *       48  24*n  per blur width: u16 sigma16, u16 kernel radius, u32 0,
 *                 u64 SSE raster, u64 SSE serpentine
 *        .   w*h  if flags bit 0: the raster result (0 or 255 per pixel)
 *        .   w*h  if flags bit 0: the serpentine result
 *
 * SSE is the sum over all pixels of v*v, v being the blurred difference
 * original - dithered in 1/256 gray levels; MSE = SSE / 65536 / pixels.
 *
 * On bad input the output is one line of text starting "dither: " and the
 * exit status is 2 (malformed input) or 3 (image too large).
 *
 * Further messages after the first are processed the same way, each giving
 * one output message, until the input ends (the compute benchmark times
 * several images in one run this way).
 */
#include <cpushare.h>

#define FS_MAX_SIDE    1024
#define FS_MAX_PIXELS  (FS_MAX_SIDE * FS_MAX_SIDE)
#define FS_MAX_SIGMAS  6
#define FS_MAX_SIGMA16 256                        /* sigma 16 pixels */
#define FS_MAX_RADIUS  ((3 * FS_MAX_SIGMA16 + 15) / 16)
#define FS_IN_HEADER   24
#define FS_OUT_HEADER  48
#define FS_WANT_IMAGES 1u

#define FS_EOF       (-1)   /* fs_process: no input at all */
#define FS_E_INPUT   2
#define FS_E_TOO_BIG 3

/* Where output goes: stdout in a job; native.c may capture it instead. */
#ifndef FS_WRITE
#define FS_WRITE(buf, n) cs_write_all(CS_STDOUT, (buf), (n))
#endif

/* Page-aligned buffers and 64-byte aligned hot functions: the image and
 * the native build then place them alike relative to pages and cache
 * lines, so that timing one against the other compares the sandbox, not
 * the luck of the layout. */
#define FS_PAGE_ALIGNED __attribute__((aligned(4096)))
#define FS_HOT __attribute__((aligned(64)))

static uint8_t fs_header[FS_IN_HEADER] FS_PAGE_ALIGNED;
static uint8_t fs_pixels[FS_MAX_PIXELS] FS_PAGE_ALIGNED;
static uint8_t fs_dithered[2][FS_MAX_PIXELS] FS_PAGE_ALIGNED;
static int32_t fs_hblur[FS_MAX_PIXELS] FS_PAGE_ALIGNED;
static int32_t fs_err[2][FS_MAX_SIDE + 2] FS_PAGE_ALIGNED;
static int32_t fs_diffrow[FS_MAX_SIDE + 2 * FS_MAX_RADIUS] FS_PAGE_ALIGNED;
static int64_t fs_vacc[FS_MAX_SIDE] FS_PAGE_ALIGNED;
static uint8_t fs_out[FS_OUT_HEADER + 24 * FS_MAX_SIGMAS] FS_PAGE_ALIGNED;

static unsigned fs_u16(const uint8_t *p) { return (unsigned)p[0] | (unsigned)p[1] << 8; }

static void fs_put16(uint8_t *p, uint32_t v) { p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); }

static void fs_put32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static void fs_put64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

/* Report bad input: one line of text on stdout, and the exit status. */
static int fs_fail(int status, const char *what, long a, long b)
{
    char line[160];
    size_t n = 0;
    const char *prefix = "dither: ";
    while (*prefix)
        line[n++] = *prefix++;
    for (const char *p = what; *p && n < sizeof line - 48; p++) {
        if (*p == '%') {            /* %: the next number, a then b */
            long v = p[1] == '1' ? a : b;
            char digits[24];
            int k = 0;
            unsigned long u = v < 0 ? (unsigned long)-v : (unsigned long)v;
            if (v < 0)
                line[n++] = '-';
            do {
                digits[k++] = (char)('0' + u % 10);
                u /= 10;
            } while (u);
            while (k)
                line[n++] = digits[--k];
            p++;
        } else {
            line[n++] = *p;
        }
    }
    line[n++] = '\n';
    FS_WRITE(line, n);
    return status;
}

/* Floyd-Steinberg error diffusion with errors kept in 1/256 gray levels.
 * Each pixel's error is split 7/16 ahead, 3/16 behind below, 5/16 below,
 * and the rounding remainder 1/16 ahead below, so that no error is lost
 * inside the image; errors falling off its edges are dropped.  The
 * serpentine scan runs odd rows right to left with the kernel mirrored. */
static FS_HOT void fs_dither(const uint8_t *src, uint8_t *dst, int w, int h, int serpentine)
{
    int32_t *cur = fs_err[0] + 1, *nxt = fs_err[1] + 1;   /* index -1 .. w */

    memset(fs_err, 0, sizeof fs_err);
    for (int y = 0; y < h; y++) {
        int back = serpentine && (y & 1);
        int dx = back ? -1 : 1;
        int x = back ? w - 1 : 0;
        const uint8_t *s = src + (size_t)y * w;
        uint8_t *d = dst + (size_t)y * w;

        for (int i = -1; i <= w; i++)
            nxt[i] = 0;
        for (int i = 0; i < w; i++, x += dx) {
            int32_t v = (int32_t)s[x] * 256 + cur[x];
            int32_t out = v >= 128 * 256 ? 255 : 0;
            int32_t e = v - out * 256;
            int32_t a = e * 7 / 16, b = e * 3 / 16, c = e * 5 / 16;
            d[x] = (uint8_t)out;
            cur[x + dx] += a;
            nxt[x - dx] += b;
            nxt[x] += c;
            nxt[x + dx] += e - a - b - c;
        }
        int32_t *t = cur;
        cur = nxt;
        nxt = t;
    }
}

/* exp(x) for -20 <= x <= 0 with IEEE double operations only: a Taylor
 * polynomial at x / 1024, then ten squarings.  Relative error ~1e-9,
 * far below the 1/65536 the weights are rounded to. */
static double fs_exp(double x)
{
    double y = x / 1024.0;
    double r = 1.0 + y * (1.0 + y * (0.5 + y * (1.0 / 6.0 + y * (1.0 / 24.0 + y / 120.0))));
    for (int i = 0; i < 10; i++)
        r *= r;
    return r;
}

/* Integer Gaussian weights w[0..radius] (w[k] for offsets +k and -k) that
 * sum to exactly 65536 over -radius..radius; returns the radius. */
static int fs_kernel(unsigned sigma16, int32_t *w)
{
    if (sigma16 == 0) {
        w[0] = 65536;
        return 0;
    }
    int radius = (int)((3 * sigma16 + 15) / 16);
    double s = sigma16 / 16.0, g[FS_MAX_RADIUS + 1], sum = 0.0;
    for (int k = 0; k <= radius; k++) {
        g[k] = fs_exp(-(double)(k * k) / (2.0 * s * s));
        sum += k ? 2.0 * g[k] : g[k];
    }
    int32_t rest = 65536;
    for (int k = radius; k >= 1; k--) {
        w[k] = (int32_t)(g[k] / sum * 65536.0 + 0.5);
        rest -= 2 * w[k];
    }
    w[0] = rest;
    return radius;
}

/* Sum of squares of the blurred difference src - dst, in 1/256 gray levels. */
static FS_HOT uint64_t fs_blurred_sse(const uint8_t *src, const uint8_t *dst, int w, int h,
                               const int32_t *wt, int r)
{
    /* Horizontal pass: difference row padded by replicating its ends. */
    for (int y = 0; y < h; y++) {
        const uint8_t *s = src + (size_t)y * w, *d = dst + (size_t)y * w;
        int32_t *row = fs_diffrow + r, *hb = fs_hblur + (size_t)y * w;
        for (int x = 0; x < w; x++)
            row[x] = (int32_t)s[x] - (int32_t)d[x];
        for (int k = 1; k <= r; k++) {
            row[-k] = row[0];
            row[w - 1 + k] = row[w - 1];
        }
        for (int x = 0; x < w; x++) {
            int32_t acc = wt[0] * row[x];
            for (int k = 1; k <= r; k++)
                acc += wt[k] * (row[x - k] + row[x + k]);
            hb[x] = acc;
        }
    }
    /* Vertical pass, rows clamped at the edges, and the sum of squares. */
    uint64_t sse = 0;
    for (int y = 0; y < h; y++) {
        for (int x = 0; x < w; x++)
            fs_vacc[x] = (int64_t)wt[0] * fs_hblur[(size_t)y * w + x];
        for (int k = 1; k <= r; k++) {
            int up = y - k < 0 ? 0 : y - k, down = y + k >= h ? h - 1 : y + k;
            const int32_t *a = fs_hblur + (size_t)up * w, *b = fs_hblur + (size_t)down * w;
            for (int x = 0; x < w; x++)
                fs_vacc[x] += (int64_t)wt[k] * (a[x] + b[x]);
        }
        for (int x = 0; x < w; x++) {
            int64_t v = (fs_vacc[x] + (1 << 23)) >> 24;
            sse += (uint64_t)(v * v);
        }
    }
    return sse;
}

/* Read one input message, process it, write the result.  Returns the exit
 * status, or FS_EOF when the input ends before a message starts. */
static int fs_process(void)
{
    uint8_t lenbuf[4];
    long got = cs_read(CS_STDIN, lenbuf, 1);
    while (got == -CS_EINTR)
        got = cs_read(CS_STDIN, lenbuf, 1);
    if (got == 0)
        return FS_EOF;
    if (got < 0 || cs_read_exact(CS_STDIN, lenbuf + 1, 3) < 0)
        return fs_fail(FS_E_INPUT, "input ends inside the message length", 0, 0);
    uint32_t len = (uint32_t)lenbuf[0] | (uint32_t)lenbuf[1] << 8
                 | (uint32_t)lenbuf[2] << 16 | (uint32_t)lenbuf[3] << 24;
    if (len < FS_IN_HEADER)
        return fs_fail(FS_E_INPUT, "message of %1 bytes is shorter than the %2-byte header",
                       len, FS_IN_HEADER);
    if (cs_read_exact(CS_STDIN, fs_header, FS_IN_HEADER) < 0)
        return fs_fail(FS_E_INPUT, "input ends inside the header", 0, 0);
    if (memcmp(fs_header, "FSD1", 4) != 0)
        return fs_fail(FS_E_INPUT, "bad magic: the input is not an FSD1 message", 0, 0);
    int w = (int)fs_u16(fs_header + 4), h = (int)fs_u16(fs_header + 6);
    unsigned flags = fs_header[8], nsigma = fs_header[9];
    if (w < 1 || h < 1)
        return fs_fail(FS_E_INPUT, "image size %1x%2 is empty", w, h);
    if (w > FS_MAX_SIDE || h > FS_MAX_SIDE)
        return fs_fail(FS_E_TOO_BIG, "image %1x%2 exceeds the maximum 1024x1024", w, h);
    if (flags & ~FS_WANT_IMAGES)
        return fs_fail(FS_E_INPUT, "unknown flags %1 in the header", (long)flags, 0);
    if (nsigma > FS_MAX_SIGMAS)
        return fs_fail(FS_E_INPUT, "%1 blur widths given, at most %2", nsigma, FS_MAX_SIGMAS);
    for (unsigned i = 0; i < FS_MAX_SIGMAS; i++) {
        unsigned s16 = fs_u16(fs_header + 12 + 2 * i);
        if (s16 > FS_MAX_SIGMA16 || (i >= nsigma && s16))
            return fs_fail(FS_E_INPUT, "blur width slot %1 holds %2/16, which is not allowed",
                           (long)i, (long)s16);
    }
    if (len != FS_IN_HEADER + (uint32_t)(w * h))
        return fs_fail(FS_E_INPUT, "message of %1 bytes does not hold a header and %2 pixels",
                       (long)len, (long)w * h);
    if (cs_read_exact(CS_STDIN, fs_pixels, (size_t)w * h) < 0)
        return fs_fail(FS_E_INPUT, "input ends inside the pixels", 0, 0);

    fs_dither(fs_pixels, fs_dithered[0], w, h, 0);
    fs_dither(fs_pixels, fs_dithered[1], w, h, 1);

    size_t npix = (size_t)w * h;
    uint64_t sum = 0, white[2] = {0, 0}, differ = 0;
    for (size_t i = 0; i < npix; i++) {
        sum += fs_pixels[i];
        white[0] += fs_dithered[0][i] != 0;
        white[1] += fs_dithered[1][i] != 0;
        differ += fs_dithered[0][i] != fs_dithered[1][i];
    }
    uint8_t *o = fs_out;
    memset(fs_out, 0, sizeof fs_out);
    memcpy(o, "FSR1", 4);
    fs_put16(o + 4, (uint32_t)w);
    fs_put16(o + 6, (uint32_t)h);
    o[8] = (uint8_t)flags;
    o[9] = (uint8_t)nsigma;
    fs_put32(o + 12, (uint32_t)npix);
    fs_put64(o + 16, sum);
    fs_put64(o + 24, white[0]);
    fs_put64(o + 32, white[1]);
    fs_put64(o + 40, differ);
    for (unsigned i = 0; i < nsigma; i++) {
        int32_t wt[FS_MAX_RADIUS + 1];
        unsigned s16 = fs_u16(fs_header + 12 + 2 * i);
        int r = fs_kernel(s16, wt);
        uint8_t *rec = o + FS_OUT_HEADER + 24 * i;
        fs_put16(rec, s16);
        fs_put16(rec + 2, (uint32_t)r);
        fs_put64(rec + 8, fs_blurred_sse(fs_pixels, fs_dithered[0], w, h, wt, r));
        fs_put64(rec + 16, fs_blurred_sse(fs_pixels, fs_dithered[1], w, h, wt, r));
    }
    size_t body = FS_OUT_HEADER + 24 * (size_t)nsigma;
    size_t total = body + ((flags & FS_WANT_IMAGES) ? 2 * npix : 0);
    uint8_t lenout[4];
    fs_put32(lenout, (uint32_t)total);
    if (FS_WRITE(lenout, 4) < 0 || FS_WRITE(fs_out, body) < 0)
        return 1;
    if ((flags & FS_WANT_IMAGES)
        && (FS_WRITE(fs_dithered[0], npix) < 0 || FS_WRITE(fs_dithered[1], npix) < 0))
        return 1;
    return 0;
}

#ifndef FS_NO_MAIN
/* One message is the usual task; more are processed one after the other
 * (one output message each) until the input ends or one is refused. */
int main(void)
{
    int status = fs_process();
    if (status == FS_EOF)
        return fs_fail(FS_E_INPUT, "no input: expected one FSD1 message", 0, 0);
    while (status == 0)
        if ((status = fs_process()) == FS_EOF)
            return 0;
    return status;
}
#endif
