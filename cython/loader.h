/* The C half of cpushare._seccomp: what runs in the job's process.
 *
 * After fork the child runs only the code declared here (raw system calls,
 * no libc, no stack protector, no Python).  It moves the job's pipes to fds
 * 0 and 1, sets rlimits, makes RDTSC and CPUID fault unless the job may
 * use them, maps a tiny "keep" area (trampoline code from a
 * sealed memfd, read+execute; a parameter block, read+write) and jumps to
 * the trampoline.  The trampoline unmaps everything else (the parent's heap,
 * libraries and stacks: the job must not read the seller's memory), maps the
 * job's regions from their memfds, reports "ready" on the status pipe,
 * closes every descriptor but 0 and 1, enters seccomp, clears its
 * parameters (but the entry and the stack top) and jumps to the entry
 * with zeroed registers.  See seccomp_loader.pyx for the parent side.
 */
#ifndef CPUSHARE_LOADER_H
#define CPUSHARE_LOADER_H

#include <stdint.h>

/* One 8-byte record on the status pipe: step 0 means "ready", any other
 * step failed with errno `err`. */
struct cps_record {
    int32_t step;
    int32_t err;
};

enum cps_step {
    CPS_READY = 0,
    CPS_SIGACTION, CPS_SIGPROCMASK, CPS_DUPFD, CPS_DUP2, CPS_CLOSE_RANGE_SETUP,
    CPS_RLIMIT_CPU, CPS_RLIMIT_CORE, CPS_RLIMIT_FSIZE, CPS_RLIMIT_NPROC, CPS_RLIMIT_NOFILE,
    CPS_PRCTL_TSC, CPS_PRCTL_NO_NEW_PRIVS, CPS_GETPID,
    CPS_MMAP_KEEP, CPS_KEEP_PLACEMENT, CPS_MMAP_TRAMPOLINE, CPS_MMAP_PARAMS, CPS_CLOSE_TRAMPOLINE,
    CPS_MUNMAP_LOW, CPS_MUNMAP_HIGH, CPS_MMAP_TEXT, CPS_MMAP_DATA, CPS_MMAP_STACK,
    CPS_ARCH_PRCTL_FS, CPS_ARCH_PRCTL_GS, CPS_WRITE_READY, CPS_CLOSE_RANGE_FINAL,
    CPS_SECCOMP_STRICT, CPS_SECCOMP_FILTER,
    CPS_FORK, CPS_RSEQ, CPS_PDEATHSIG, CPS_ZYGOTE_SEND, CPS_ZYGOTE_RECV,
    CPS_SIGNALFD, CPS_GET_SECCOMP, CPS_ARCH_SET_CPUID,
    CPS_NSTEPS
};

/* Written by the zygote on a job's status pipe once it reaped the job:
 * step CPS_EXITED, err = the wait status, then user and system CPU time. */
#define CPS_EXITED 1000
struct cps_exit_record {
    int32_t step;
    int32_t wstatus;
    uint64_t utime_us, stime_us;
};

#define CPS_MODE_STRICT 1
#define CPS_MODE_FILTER 2

struct cps_spec {
    int stdin_fd, stdout_fd, status_fd, text_fd, data_fd, tramp_fd;
    int mode;          /* CPS_MODE_STRICT or CPS_MODE_FILTER */
    int allow_tsc;
    int allow_cpuid;   /* else CPUID faults, where the CPU can (ARCH_SET_CPUID) */
    int xsave;         /* the CPU and kernel support XSAVE/XRSTOR */
    uint64_t text_start, text_size;
    uint64_t data_start, data_size;    /* data_size 0: no data region */
    uint64_t stack_start, stack_size;
    uint64_t entry, stack_top;
    uint64_t cpu_soft, cpu_hard;       /* RLIMIT_CPU, seconds */
    int in_zygote;     /* forked by the zygote: no libc state left to undo */
    int zygote_pid;    /* the zygote (the job dies with it) */
};

/* The trampoline's code, copied into a sealed memfd by the parent. */
extern const unsigned char cps_tramp_begin[], cps_tramp_end[];

/* Fork a job; returns its pid, or -errno when fork itself failed.  All
 * signals are blocked in the calling thread around the fork. */
long cps_spawn(const struct cps_spec *spec);

/* The zygote: a small process forked once, which unmaps everything of its
 * parent but this extension's own image and a fresh stack, then forks jobs
 * on request over a SOCK_SEQPACKET socket.  Returns its pid or -errno. */
long cps_zygote_start(int sock, int tramp_fd);

/* Ask the zygote for a job (the spec's fds travel with SCM_RIGHTS).
 * Returns the job's pid and stores a pidfd for it in *pidfd and the mode
 * used in *mode; or -errno, with the failing step in *step. */
long cps_zygote_spawn(int sock, const struct cps_spec *spec, int *pidfd, int *mode, int *step);

/* prctl(PR_GET_SECCOMP) for the calling thread: 0, 1, 2 or -errno. */
long cps_seccomp_mode(void);

/* 1 when XSAVE is usable (CPUID.1:ECX.OSXSAVE). */
int cps_have_xsave(void);

#endif
