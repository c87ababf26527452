/* The C baseline of bench/sandbox_start.py: the least a seccomp job start
 * can cost.  Per iteration: fork; the child maps one page, enters
 * SECCOMP_MODE_STRICT and exits through the raw exit system call; the
 * parent reaps it.  Prints one latency per line, in microseconds.
 *
 *   gcc -O2 -o baseline_start baseline_start.c && ./baseline_start 2000
 */
#define _GNU_SOURCE
#include <linux/seccomp.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

int main(int argc, char **argv)
{
    int n = argc > 1 ? atoi(argv[1]) : 1000;
    for (int i = 0; i < n; i++) {
        double t0 = now_us();
        pid_t pid = fork();
        if (pid < 0) {
            perror("fork");
            return 1;
        }
        if (pid == 0) {
            void *p = mmap((void *)0x400000, 4096, PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
            if (p == MAP_FAILED)
                syscall(SYS_exit, 2);
            if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_STRICT) != 0)
                syscall(SYS_exit, 3);
            syscall(SYS_exit, 0);
        }
        int status;
        if (waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status)) {
            fprintf(stderr, "baseline_start: child failed (wait status %#x)\n", status);
            return 1;
        }
        printf("%.2f\n", now_us() - t0);
    }
    return 0;
}
