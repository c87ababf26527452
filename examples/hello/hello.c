/* hello: the smallest CPUShare job.  It writes one line and exits 0. */
#include <cpushare.h>

int main(void)
{
    static const char msg[] = "hello, world\n";
    return cs_write_all(CS_STDOUT, msg, sizeof msg - 1) < 0;
}
