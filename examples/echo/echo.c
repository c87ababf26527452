/* echo: copies its input to its output, byte for byte, until end of input.
 * The buffer lives in .bss: a job has no heap. */
#include <cpushare.h>

static char buf[64 * 1024];

int main(void)
{
    for (;;) {
        long n = cs_read(CS_STDIN, buf, sizeof buf);
        if (n == 0)
            return 0;
        if (n < 0)
            return 1;
        if (cs_write_all(CS_STDOUT, buf, (size_t)n) < 0)
            return 1;
    }
}
