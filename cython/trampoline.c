/* The job's side of cpushare._seccomp: see loader.h for the sequence.
 *
 * Everything from cps_child() on runs in the forked child, which shares
 * nothing with the parent but a copy of its memory: only raw system calls
 * (no libc, no errno, no TLS, so no stack protector either) and no heap.
 */
#define _GNU_SOURCE
#include <cpuid.h>
#include <link.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <errno.h>
#include <pthread.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <signal.h>
#include <stddef.h>
#include <sys/rseq.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "loader.h"

#define NOSP __attribute__((no_stack_protector, noinline))

/* -- raw system calls ---------------------------------------------------- */

static inline long sys6(long nr, long a1, long a2, long a3, long a4, long a5, long a6)
{
    register long r10 __asm__("r10") = a4;
    register long r8 __asm__("r8") = a5;
    register long r9 __asm__("r9") = a6;
    long ret;
    __asm__ volatile("syscall"
                     : "=a"(ret)
                     : "a"(nr), "D"(a1), "S"(a2), "d"(a3), "r"(r10), "r"(r8), "r"(r9)
                     : "rcx", "r11", "memory");
    return ret;
}
#define sys1(n, a) sys6(n, (long)(a), 0, 0, 0, 0, 0)
#define sys2(n, a, b) sys6(n, (long)(a), (long)(b), 0, 0, 0, 0)
#define sys3(n, a, b, c) sys6(n, (long)(a), (long)(b), (long)(c), 0, 0, 0)
#define sys4(n, a, b, c, d) sys6(n, (long)(a), (long)(b), (long)(c), (long)(d), 0, 0)

#define IS_ERR(r) ((unsigned long)(r) >= (unsigned long)-4095L)

/* Constants of the kernel ABI, spelled out so no libc header decides them. */
#define K_PROT_NONE 0
#define K_PROT_READ 1
#define K_PROT_WRITE 2
#define K_PROT_EXEC 4
#define K_MAP_PRIVATE 0x02
#define K_MAP_FIXED 0x10
#define K_MAP_ANONYMOUS 0x20
#define K_MAP_NORESERVE 0x4000
#define K_F_DUPFD 0
#define K_PR_SET_PDEATHSIG 1
#define K_PR_SET_NAME 15
#define K_PR_GET_SECCOMP 21
#define K_PR_SET_SECCOMP 22
#define K_PR_SET_TSC 26
#define K_PR_TSC_SIGSEGV 2
#define K_PR_SET_NO_NEW_PRIVS 38
#define K_ARCH_SET_GS 0x1001
#define K_ARCH_SET_FS 0x1002
#define K_ARCH_SET_CPUID 0x1012
#define K_RLIMIT_CPU 0
#define K_RLIMIT_FSIZE 1
#define K_RLIMIT_CORE 4
#define K_RLIMIT_NPROC 6
#define K_RLIMIT_NOFILE 7
#define K_SIGKILL 9
#define K_SIGUSR1 10
#define K_SIGSTOP 19
#define K_SIGPIPE 13
#define K_SIGCHLD 17
#define K_SIG_IGN 1
#define K_CLONE_PIDFD 0x1000
#define K_O_NONBLOCK 0x800
#define K_O_CLOEXEC 0x80000
#define K_WNOHANG 1
#define K_POLLIN 1
#define K_POLLERR 8
#define K_POLLHUP 0x10
#define K_EINTR 4
#define K_EAGAIN 11
#define K_ENODEV 19
#define K_EINVAL 22
#define K_MSG_NOSIGNAL 0x4000

#define PAGE 4096UL
/* The highest user address with 4-level paging (TASK_SIZE_MAX). */
#define TASK_TOP 0x7ffffffff000UL
/* Where the keep area goes when the kernel can put it there: far from the
 * parent's libraries, so its address says nothing about their layout. */
#define KEEP_HINT 0x100000000000UL
/* Nothing of the keep area may fall below this (the job's address range). */
#define JOB_ADDRESS_END 0x80000000UL

/* -- the keep area ---------------------------------------------------------
 * page 0: trampoline code (r-x, from the memfd)
 * page 1: parameters (rw-), cleared by the trampoline before the jump but
 *         for the entry and the stack top: the job must find there nothing
 *         of the host (its PID, the steps, the seccomp mode)
 * pages 2..5: a zeroed XSAVE area: XRSTOR from it puts every FPU/SIMD
 *             register in its initial state (the parent's xmm registers
 *             may hold key material). */
#define CODE_SIZE PAGE
#define PARAMS_SIZE (5 * PAGE)
#define KEEP_SIZE (CODE_SIZE + PARAMS_SIZE)

#define P_NSTEPS 0
#define P_ENTRY 8
#define P_STACK_TOP 16
#define P_FLAGS 24
#define P_PID 32
#define P_READY 40
#define P_FAIL 48
#define P_FPROG 64
#define P_NOFILE 96
#define P_FILTER 128
#define P_STEPS 256
#define STEP_SIZE 64
#define MAX_STEPS 32
#define P_XSAVE 4096
/* Quadwords from P_FLAGS to the end of the parameters: what the trampoline
 * clears before the jump (a literal, for the assembler). */
#define P_CLEAR_QWORDS 2557
_Static_assert(P_CLEAR_QWORDS * 8 == PARAMS_SIZE - P_FLAGS, "P_CLEAR_QWORDS");
_Static_assert(P_ENTRY < P_FLAGS && P_STACK_TOP < P_FLAGS, "kept below P_FLAGS");

#define XSTR(x) #x
#define STR(x) XSTR(x)

/* The trampoline.  Position independent, no stack until the job's own:
 *   for each step: rax = syscall(nr, a1..a6); an error writes the step's id
 *   and errno to fd 2, sends SIGUSR1 to itself (the status pipe is closed
 *   by the time seccomp runs, so that is how a failing seccomp shows) and
 *   exits 127;
 *   then XRSTOR (or FXRSTOR) the zeroed area, clear the parameters but the
 *   entry and stack top, rsp = stack top, every other register zero,
 *   rflags 0x202, jump to the entry. */
__asm__(
    ".text\n"
    ".balign 16\n"
    ".globl cps_tramp_begin\n"
    ".hidden cps_tramp_begin\n"
    "cps_tramp_begin:\n"
    ".Ltb:\n"
    "    lea .Ltb+4096(%rip), %rbx\n"
    "    mov " STR(P_NSTEPS) "(%rbx), %r12\n"
    "    lea " STR(P_STEPS) "(%rbx), %r13\n"
    "    xor %r14d, %r14d\n"
    "1:  cmp %r12, %r14\n"
    "    jae 3f\n"
    "    mov 0(%r13), %rax\n"
    "    mov 8(%r13), %rdi\n"
    "    mov 16(%r13), %rsi\n"
    "    mov 24(%r13), %rdx\n"
    "    mov 32(%r13), %r10\n"
    "    mov 40(%r13), %r8\n"
    "    mov 48(%r13), %r9\n"
    "    syscall\n"
    "    cmp $-4095, %rax\n"
    "    jae 2f\n"
    "    add $" STR(STEP_SIZE) ", %r13\n"
    "    inc %r14\n"
    "    jmp 1b\n"
    "2:  neg %eax\n"
    "    mov %eax, " STR(P_FAIL) "+4(%rbx)\n"
    "    mov 56(%r13), %eax\n"
    "    mov %eax, " STR(P_FAIL) "(%rbx)\n"
    "    mov $1, %eax\n"
    "    mov $2, %edi\n"
    "    lea " STR(P_FAIL) "(%rbx), %rsi\n"
    "    mov $8, %edx\n"
    "    syscall\n"
    "    mov $62, %eax\n"
    "    mov " STR(P_PID) "(%rbx), %rdi\n"
    "    mov $10, %esi\n"
    "    syscall\n"
    "    mov $60, %eax\n"
    "    mov $127, %edi\n"
    "    syscall\n"
    "    ud2\n"
    "3:  testq $1, " STR(P_FLAGS) "(%rbx)\n"
    "    jz 4f\n"
    "    xor %ecx, %ecx\n"
    "    xgetbv\n"
    "    and $0xfffbffff, %eax\n" /* not AMX tile data: XFD may trap it */
    "    xrstor64 " STR(P_XSAVE) "(%rbx)\n"
    "    jmp 5f\n"
    "4:  fxrstor64 " STR(P_XSAVE) "(%rbx)\n"
    /* Nothing of the set-up may stay readable (the PID for the kill
     * above, the steps, the filter, the XSAVE area): clear the parameter
     * block but the entry and the stack top, the job's own. */
    "5:  movq $0, " STR(P_NSTEPS) "(%rbx)\n"
    "    lea " STR(P_FLAGS) "(%rbx), %rdi\n"
    "    mov $" STR(P_CLEAR_QWORDS) ", %ecx\n"
    "    xor %eax, %eax\n"
    "    cld\n"
    "    rep stosq\n"
    "    mov .Ltb+4096+" STR(P_STACK_TOP) "(%rip), %rsp\n"
    "    xor %eax, %eax\n"
    "    xor %ebx, %ebx\n"
    "    xor %ecx, %ecx\n"
    "    xor %edx, %edx\n"
    "    xor %esi, %esi\n"
    "    xor %edi, %edi\n"
    "    xor %ebp, %ebp\n"
    "    xor %r8d, %r8d\n"
    "    xor %r9d, %r9d\n"
    "    xor %r10d, %r10d\n"
    "    xor %r11d, %r11d\n"
    "    xor %r12d, %r12d\n"
    "    xor %r13d, %r13d\n"
    "    xor %r14d, %r14d\n"
    "    xor %r15d, %r15d\n"
    "    pushq $0x202\n" /* rflags: IF and the reserved bit only */
    "    popfq\n"
    "    jmp *.Ltb+4096+" STR(P_ENTRY) "(%rip)\n"
    ".globl cps_tramp_end\n"
    ".hidden cps_tramp_end\n"
    "cps_tramp_end:\n"
    ".previous\n");

/* -- the child, before the trampoline ------------------------------------- */

struct k_sigaction {
    unsigned long handler, flags, restorer, mask;
};
struct k_rlimit {
    unsigned long cur, max;
};

static inline __attribute__((always_inline, noreturn)) void fail(int fd, int step, long ret)
{
    struct cps_record rec;
    rec.step = step;
    rec.err = (int)-ret;
    sys3(__NR_write, fd, &rec, sizeof rec);
    sys1(__NR_exit, 127);
    __builtin_unreachable();
}

static inline __attribute__((always_inline)) void put_step(unsigned char *p, long n, long id,
                                                           long nr, long a1, long a2, long a3,
                                                           long a4, long a5, long a6)
{
    volatile unsigned long *s = (volatile unsigned long *)(p + P_STEPS + n * STEP_SIZE);
    s[0] = nr;
    s[1] = a1;
    s[2] = a2;
    s[3] = a3;
    s[4] = a4;
    s[5] = a5;
    s[6] = a6;
    s[7] = id;
}

static inline __attribute__((always_inline)) void put_insn(unsigned char *p, int i, unsigned short code,
                                                           unsigned char jt, unsigned char jf,
                                                           unsigned int k)
{
    volatile struct sock_filter *f = (volatile struct sock_filter *)(p + P_FILTER) + i;
    f->code = code;
    f->jt = jt;
    f->jf = jf;
    f->k = k;
}

/* Exactly what SECCOMP_MODE_STRICT allows: read, write, exit, rt_sigreturn,
 * native x86-64 only (no int 0x80, no x32); anything else kills. */
static inline __attribute__((always_inline)) int put_filter(unsigned char *p)
{
    int n = 0;
    put_insn(p, n++, BPF_LD | BPF_W | BPF_ABS, 0, 0, offsetof(struct seccomp_data, arch));
    put_insn(p, n++, BPF_JMP | BPF_JEQ | BPF_K, 1, 0, AUDIT_ARCH_X86_64);
    put_insn(p, n++, BPF_RET | BPF_K, 0, 0, SECCOMP_RET_KILL_PROCESS);
    put_insn(p, n++, BPF_LD | BPF_W | BPF_ABS, 0, 0, offsetof(struct seccomp_data, nr));
    put_insn(p, n++, BPF_JMP | BPF_JGE | BPF_K, 5, 0, 0x40000000); /* x32 (and nr < 0) */
    put_insn(p, n++, BPF_JMP | BPF_JEQ | BPF_K, 5, 0, __NR_read);
    put_insn(p, n++, BPF_JMP | BPF_JEQ | BPF_K, 4, 0, __NR_write);
    put_insn(p, n++, BPF_JMP | BPF_JEQ | BPF_K, 3, 0, __NR_exit);
    put_insn(p, n++, BPF_JMP | BPF_JEQ | BPF_K, 2, 0, __NR_rt_sigreturn);
    put_insn(p, n++, BPF_RET | BPF_K, 0, 0, SECCOMP_RET_KILL_PROCESS);
    put_insn(p, n++, BPF_RET | BPF_K, 0, 0, SECCOMP_RET_KILL_PROCESS);
    put_insn(p, n++, BPF_RET | BPF_K, 0, 0, SECCOMP_RET_ALLOW);
    return n;
}

static NOSP __attribute__((noreturn)) void cps_child(const struct cps_spec *s)
{
    int status = s->status_fd;
    long r;
    int i;

    /* Signals: default actions (Python ignores SIGPIPE, and so does the
     * zygote, whose other signals are default already), nothing blocked. */
    for (i = s->in_zygote ? K_SIGPIPE : 1; i <= (s->in_zygote ? K_SIGPIPE : 64); i++) {
        struct k_sigaction sa = {0, 0, 0, 0};
        if (i == K_SIGKILL || i == K_SIGSTOP)
            continue;
        r = sys4(__NR_rt_sigaction, i, &sa, 0, 8);
        if (IS_ERR(r) && s->in_zygote)
            fail(status, CPS_SIGACTION, r);
    }

    /* Descriptors: 0 stdin, 1 stdout, 2 status, 3 text, 4 data, 5 trampoline,
     * by way of copies above 15 so no target clobbers a source. */
    {
        int src[6], tmp[6];
        src[0] = s->stdin_fd;
        src[1] = s->stdout_fd;
        src[2] = s->status_fd;
        src[3] = s->text_fd;
        src[4] = s->data_fd;
        src[5] = s->tramp_fd;
        for (i = 0; i < 6; i++) {
            tmp[i] = -1;
            if (src[i] < 0)
                continue;
            r = sys3(__NR_fcntl, src[i], K_F_DUPFD, 16);
            if (IS_ERR(r))
                fail(status, CPS_DUPFD, r);
            tmp[i] = (int)r;
        }
        for (i = 0; i < 6; i++) {
            if (tmp[i] < 0)
                continue;
            r = sys2(__NR_dup2, tmp[i], i);
            if (IS_ERR(r))
                fail(status, CPS_DUP2, r);
        }
        status = 2;
        r = sys3(__NR_close_range, 6, ~0U, 0);
        if (IS_ERR(r))
            fail(status, CPS_CLOSE_RANGE_SETUP, r);
    }
    r = sys4(__NR_rt_sigprocmask, SIG_SETMASK, &(unsigned long){0}, 0, 8);
    if (IS_ERR(r))
        fail(status, CPS_SIGPROCMASK, r);

    /* Resource limits. */
    {
        struct k_rlimit cpu = {s->cpu_soft, s->cpu_hard}, zero = {0, 0};
        r = sys2(__NR_setrlimit, K_RLIMIT_CPU, &cpu);
        if (IS_ERR(r))
            fail(status, CPS_RLIMIT_CPU, r);
        r = sys2(__NR_setrlimit, K_RLIMIT_CORE, &zero);
        if (IS_ERR(r))
            fail(status, CPS_RLIMIT_CORE, r);
        r = sys2(__NR_setrlimit, K_RLIMIT_FSIZE, &zero);
        if (IS_ERR(r))
            fail(status, CPS_RLIMIT_FSIZE, r);
        r = sys2(__NR_setrlimit, K_RLIMIT_NPROC, &zero);
        if (IS_ERR(r))
            fail(status, CPS_RLIMIT_NPROC, r);
    }
    if (!s->allow_tsc) {
        r = sys2(__NR_prctl, K_PR_SET_TSC, K_PR_TSC_SIGSEGV);
        if (IS_ERR(r))
            fail(status, CPS_PRCTL_TSC, r);
    }
    /* CPUID faults (SIGSEGV) where the CPU can make it fault; elsewhere
     * (ENODEV) it stays, like the rest of what cpushare.cpu(5) lists. */
    if (!s->allow_cpuid) {
        r = sys2(__NR_arch_prctl, K_ARCH_SET_CPUID, 0);
        if (IS_ERR(r) && r != -K_ENODEV)
            fail(status, CPS_ARCH_SET_CPUID, r);
    }
    if (s->mode == CPS_MODE_FILTER) {
        r = sys6(__NR_prctl, K_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0, 0);
        if (IS_ERR(r))
            fail(status, CPS_PRCTL_NO_NEW_PRIVS, r);
    }
    /* Restartable sequences: glibc registered an area in this thread's TLS,
     * which is about to be unmapped; the kernel would then kill the job
     * with SIGSEGV on its next preemption.  Unregister it. */
    if (!s->in_zygote && __rseq_size) {
        void *area = (char *)__builtin_thread_pointer() + __rseq_offset;
        r = sys4(__NR_rseq, area, 32, 1 /* RSEQ_FLAG_UNREGISTER */, RSEQ_SIG);
        if (IS_ERR(r) && __rseq_size != 32)
            r = sys4(__NR_rseq, area, __rseq_size, 1, RSEQ_SIG);
        if (IS_ERR(r))
            fail(status, CPS_RSEQ, r);
    }
    long pid = sys1(__NR_getpid, 0);
    if (IS_ERR(pid))
        fail(status, CPS_GETPID, pid);
    if (s->in_zygote) {
        /* The job dies with the zygote, which dies with its parent's socket. */
        r = sys2(__NR_prctl, K_PR_SET_PDEATHSIG, K_SIGKILL);
        if (IS_ERR(r))
            fail(status, CPS_PDEATHSIG, r);
        if (sys1(__NR_getppid, 0) != s->zygote_pid)
            fail(status, CPS_PDEATHSIG, -3 /* ESRCH */);
    }

    /* The keep area. */
    unsigned long keep = (unsigned long)sys6(__NR_mmap, KEEP_HINT, KEEP_SIZE, K_PROT_NONE,
                                             K_MAP_PRIVATE | K_MAP_ANONYMOUS | K_MAP_NORESERVE, -1, 0);
    if (IS_ERR(keep))
        fail(status, CPS_MMAP_KEEP, (long)keep);
    if (keep < JOB_ADDRESS_END || keep + KEEP_SIZE > TASK_TOP)
        fail(status, CPS_KEEP_PLACEMENT, -14 /* EFAULT */);
    r = sys6(__NR_mmap, keep, CODE_SIZE, K_PROT_READ | K_PROT_EXEC, K_MAP_PRIVATE | K_MAP_FIXED, 5, 0);
    if (IS_ERR(r))
        fail(status, CPS_MMAP_TRAMPOLINE, r);
    r = sys6(__NR_mmap, keep + CODE_SIZE, PARAMS_SIZE, K_PROT_READ | K_PROT_WRITE,
             K_MAP_PRIVATE | K_MAP_FIXED | K_MAP_ANONYMOUS, -1, 0);
    if (IS_ERR(r))
        fail(status, CPS_MMAP_PARAMS, r);
    r = sys1(__NR_close, 5);
    if (IS_ERR(r))
        fail(status, CPS_CLOSE_TRAMPOLINE, r);

    unsigned char *p = (unsigned char *)(keep + CODE_SIZE);
    volatile unsigned long *q = (volatile unsigned long *)p;
    q[P_ENTRY / 8] = s->entry;
    q[P_STACK_TOP / 8] = s->stack_top;
    q[P_FLAGS / 8] = s->xsave ? 1 : 0;
    q[P_PID / 8] = (unsigned long)pid;
    /* ready record {0, 0} is already zero; the XSAVE area's legacy part
     * needs a valid FCW and MXCSR, its header all zero (= initial state). */
    *(volatile unsigned short *)(p + P_XSAVE + 0) = 0x037f;
    *(volatile unsigned int *)(p + P_XSAVE + 24) = 0x1f80;
    if (s->mode == CPS_MODE_FILTER) {
        int n = put_filter(p);
        *(volatile unsigned short *)(p + P_FPROG) = (unsigned short)n;
        *(volatile unsigned long *)(p + P_FPROG + 8) = (unsigned long)(p + P_FILTER);
    }

    long n = 0;
    unsigned long keep_end = keep + KEEP_SIZE;
    struct k_rlimit *nofile = (struct k_rlimit *)(p + P_NOFILE);
    nofile->cur = 2;
    nofile->max = 2;
    put_step(p, n++, CPS_MUNMAP_LOW, __NR_munmap, 0, keep, 0, 0, 0, 0);
    put_step(p, n++, CPS_MUNMAP_HIGH, __NR_munmap, keep_end, TASK_TOP - keep_end, 0, 0, 0, 0);
    put_step(p, n++, CPS_MMAP_TEXT, __NR_mmap, s->text_start, s->text_size, K_PROT_READ | K_PROT_EXEC,
             K_MAP_PRIVATE | K_MAP_FIXED, 3, 0);
    if (s->data_size)
        put_step(p, n++, CPS_MMAP_DATA, __NR_mmap, s->data_start, s->data_size,
                 K_PROT_READ | K_PROT_WRITE, K_MAP_PRIVATE | K_MAP_FIXED, 4, 0);
    put_step(p, n++, CPS_MMAP_STACK, __NR_mmap, s->stack_start, s->stack_size,
             K_PROT_READ | K_PROT_WRITE, K_MAP_PRIVATE | K_MAP_FIXED | K_MAP_ANONYMOUS | K_MAP_NORESERVE,
             -1, 0);
    put_step(p, n++, CPS_ARCH_PRCTL_FS, __NR_arch_prctl, K_ARCH_SET_FS, 0, 0, 0, 0, 0);
    put_step(p, n++, CPS_ARCH_PRCTL_GS, __NR_arch_prctl, K_ARCH_SET_GS, 0, 0, 0, 0, 0);
    put_step(p, n++, CPS_WRITE_READY, __NR_write, 2, (long)(p + P_READY), sizeof(struct cps_record), 0, 0, 0);
    put_step(p, n++, CPS_CLOSE_RANGE_FINAL, __NR_close_range, 2, ~0U, 0, 0, 0, 0);
    put_step(p, n++, CPS_RLIMIT_NOFILE, __NR_setrlimit, K_RLIMIT_NOFILE, (long)nofile, 0, 0, 0, 0);
    if (s->mode == CPS_MODE_FILTER)
        put_step(p, n++, CPS_SECCOMP_FILTER, __NR_prctl, K_PR_SET_SECCOMP, SECCOMP_MODE_FILTER,
                 (long)(p + P_FPROG), 0, 0, 0);
    else
        put_step(p, n++, CPS_SECCOMP_STRICT, __NR_prctl, K_PR_SET_SECCOMP, SECCOMP_MODE_STRICT, 0, 0, 0, 0);
    q[P_NSTEPS / 8] = (unsigned long)n;

    __asm__ volatile("jmp *%0" : : "r"(keep) : "memory");
    __builtin_unreachable();
}


/* -- the zygote ---------------------------------------------------------------
 * Forked once from the Python process.  It keeps nothing of it but this
 * extension's own image (code and constants; no libc is called) and a
 * fresh area for its stack and job table, so forking a job from it copies
 * almost nothing and the job's trampoline has almost nothing to unmap.
 * fds: 3 the socket to the parent, 4 the trampoline memfd, and a signalfd
 * for SIGCHLD.  Requests are one SOCK_SEQPACKET message each: a zreq with
 * the job's fds (stdin, stdout, status, text[, data]) as SCM_RIGHTS; the
 * reply is a zreply with a pidfd of the job.  When a job ends the zygote
 * writes a cps_exit_record (wait status, rusage) to its status pipe. */

#define ZMAGIC 0x6370757368617265UL /* "cpushare" */
#define MAX_JOBS 4096
#define ZAREA_SIZE (512UL * 1024)
#define ZSTACK_OFFSET (128UL * 1024) /* the state below, the stack above */

struct zreq {
    uint64_t magic;
    struct cps_spec spec;
};
struct zreply {
    int64_t pid;   /* or -errno */
    int32_t step;  /* the failing step when pid < 0 */
    int32_t mode;  /* the seccomp mode the job will use */
};
struct zjob {
    int pid, status_fd;
};
struct zstate {
    int sock, tramp, sfd, filtered, self_pid, njobs;
    unsigned long so_lo, so_hi, area_lo, area_hi;
    struct zjob jobs[MAX_JOBS];
};
struct k_pollfd {
    int fd;
    short events, revents;
};
struct k_rusage {
    long utime_sec, utime_usec, stime_sec, stime_usec;
    long rest[14];
};

static NOSP __attribute__((noreturn)) void zexit(int code)
{
    sys1(__NR_exit, code);
    __builtin_unreachable();
}

static NOSP void zreply_send(struct zstate *z, long pid, int step, int mode, int pidfd)
{
    struct zreply rep;
    struct iovec iov;
    struct msghdr msg;
    union {
        struct cmsghdr h;
        char buf[CMSG_SPACE(sizeof(int))];
    } cb;
    rep.pid = pid;
    rep.step = step;
    rep.mode = mode;
    iov.iov_base = &rep;
    iov.iov_len = sizeof rep;
    msg.msg_name = 0;
    msg.msg_namelen = 0;
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = 0;
    msg.msg_controllen = 0;
    msg.msg_flags = 0;
    if (pidfd >= 0) {
        cb.h.cmsg_len = CMSG_LEN(sizeof(int));
        cb.h.cmsg_level = SOL_SOCKET;
        cb.h.cmsg_type = SCM_RIGHTS;
        *(volatile int *)CMSG_DATA(&cb.h) = pidfd;
        msg.msg_control = cb.buf;
        msg.msg_controllen = CMSG_SPACE(sizeof(int));
    }
    if (IS_ERR(sys3(__NR_sendmsg, z->sock, &msg, K_MSG_NOSIGNAL)))
        zexit(1); /* the parent is gone */
}

static NOSP __attribute__((noreturn)) void zfail(int sock, int step, long err)
{
    struct zreply rep;
    rep.pid = err;
    rep.step = step;
    rep.mode = 0;
    sys3(__NR_write, sock, &rep, sizeof rep);
    zexit(1);
}

static NOSP void zreap(struct zstate *z)
{
    char buf[512];
    while (!IS_ERR(sys3(__NR_read, z->sfd, buf, sizeof buf)))
        ;
    for (;;) {
        struct k_rusage ru;
        int st = 0, i;
        long pid = sys4(__NR_wait4, -1, &st, K_WNOHANG, &ru);
        if (pid <= 0)
            break;
        for (i = 0; i < z->njobs; i++)
            if (z->jobs[i].pid == pid)
                break;
        if (i == z->njobs)
            continue;
        struct cps_exit_record rec;
        rec.step = CPS_EXITED;
        rec.wstatus = st;
        rec.utime_us = (uint64_t)ru.utime_sec * 1000000 + (uint64_t)ru.utime_usec;
        rec.stime_us = (uint64_t)ru.stime_sec * 1000000 + (uint64_t)ru.stime_usec;
        sys3(__NR_write, z->jobs[i].status_fd, &rec, sizeof rec);
        sys1(__NR_close, z->jobs[i].status_fd);
        z->njobs--;
        z->jobs[i].pid = z->jobs[z->njobs].pid;
        z->jobs[i].status_fd = z->jobs[z->njobs].status_fd;
    }
}

static NOSP void zrequest(struct zstate *z)
{
    struct zreq req;
    struct iovec iov;
    struct msghdr msg;
    union {
        struct cmsghdr h;
        char buf[CMSG_SPACE(8 * sizeof(int))];
    } cb;
    int fds[8], nfds = 0, i;
    iov.iov_base = &req;
    iov.iov_len = sizeof req;
    msg.msg_name = 0;
    msg.msg_namelen = 0;
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cb.buf;
    msg.msg_controllen = sizeof cb.buf;
    msg.msg_flags = 0;
    long n = sys3(__NR_recvmsg, z->sock, &msg, 0);
    if (n == -K_EINTR || n == -K_EAGAIN)
        return;
    if (n <= 0)
        zexit(0); /* the parent closed its end: its jobs die with us */
    if (msg.msg_controllen >= CMSG_LEN(sizeof(int)) && cb.h.cmsg_level == SOL_SOCKET &&
        cb.h.cmsg_type == SCM_RIGHTS) {
        nfds = (int)((cb.h.cmsg_len - CMSG_LEN(0)) / sizeof(int));
        if (nfds > 8)
            nfds = 8;
        for (i = 0; i < nfds; i++)
            fds[i] = ((volatile int *)CMSG_DATA(&cb.h))[i];
    }
    struct cps_spec *s = &req.spec;
    if (n != (long)sizeof req || req.magic != ZMAGIC || (msg.msg_flags & MSG_CTRUNC) ||
        nfds != (s->data_size ? 5 : 4) || z->njobs >= MAX_JOBS) {
        for (i = 0; i < nfds; i++)
            sys1(__NR_close, fds[i]);
        zreply_send(z, z->njobs >= MAX_JOBS ? -K_EAGAIN : -K_EINVAL, CPS_FORK, 0, -1);
        return;
    }
    s->stdin_fd = fds[0];
    s->stdout_fd = fds[1];
    s->status_fd = fds[2];
    s->text_fd = fds[3];
    s->data_fd = nfds == 5 ? fds[4] : -1;
    s->tramp_fd = z->tramp;
    s->in_zygote = 1;
    s->zygote_pid = z->self_pid;
    if (z->filtered)
        s->mode = CPS_MODE_FILTER; /* the kernel would refuse strict mode */
    int pidfd = -1;
    long pid = sys6(__NR_clone, K_SIGCHLD | K_CLONE_PIDFD, 0, (long)&pidfd, 0, 0, 0);
    if (pid == 0)
        cps_child(s);
    if (IS_ERR(pid)) {
        for (i = 0; i < nfds; i++)
            sys1(__NR_close, fds[i]);
        zreply_send(z, pid, CPS_FORK, 0, -1);
        return;
    }
    z->jobs[z->njobs].pid = (int)pid;
    z->jobs[z->njobs].status_fd = fds[2];
    z->njobs++;
    zreply_send(z, pid, 0, s->mode, pidfd);
    sys1(__NR_close, pidfd);
    for (i = 0; i < nfds; i++)
        if (i != 2)
            sys1(__NR_close, fds[i]);
}

static NOSP __attribute__((noreturn, used)) void zmain(struct zstate *z)
{
    /* Unmap everything but this extension's image and the zygote's area. */
    unsigned long lo1 = z->so_lo, hi1 = z->so_hi, lo2 = z->area_lo, hi2 = z->area_hi, t;
    if (lo2 < lo1) {
        t = lo1, lo1 = lo2, lo2 = t;
        t = hi1, hi1 = hi2, hi2 = t;
    }
    long r = sys2(__NR_munmap, 0, lo1);
    if (IS_ERR(r))
        zfail(z->sock, CPS_MUNMAP_LOW, r);
    if (lo2 > hi1) {
        r = sys2(__NR_munmap, hi1, lo2 - hi1);
        if (IS_ERR(r))
            zfail(z->sock, CPS_MUNMAP_LOW, r);
    }
    r = sys2(__NR_munmap, hi2, TASK_TOP - hi2);
    if (IS_ERR(r))
        zfail(z->sock, CPS_MUNMAP_HIGH, r);
    /* ready: {pid 0, step 0, the mode its jobs will get} */
    zreply_send(z, 0, 0, z->filtered ? CPS_MODE_FILTER : CPS_MODE_STRICT, -1);
    for (;;) {
        struct k_pollfd pf[2];
        pf[0].fd = z->sock;
        pf[0].events = K_POLLIN;
        pf[0].revents = 0;
        pf[1].fd = z->sfd;
        pf[1].events = K_POLLIN;
        pf[1].revents = 0;
        r = sys3(__NR_poll, pf, 2, -1);
        if (r == -K_EINTR)
            continue;
        if (IS_ERR(r))
            zexit(1);
        if (pf[1].revents)
            zreap(z);
        if (pf[0].revents & (K_POLLIN | K_POLLHUP | K_POLLERR))
            zrequest(z);
    }
}

static NOSP __attribute__((noreturn)) void zboot(int sock, int tramp, unsigned long so_lo, unsigned long so_hi)
{
    int i;
    long r, tmp_sock, tmp_tramp;
    for (i = 1; i <= 64; i++) {
        struct k_sigaction sa = {0, 0, 0, 0};
        if (i == K_SIGKILL || i == K_SIGSTOP)
            continue;
        if (i == K_SIGPIPE)
            sa.handler = K_SIG_IGN;
        sys4(__NR_rt_sigaction, i, &sa, 0, 8);
    }
    unsigned long chld = 1UL << (K_SIGCHLD - 1);
    r = sys4(__NR_rt_sigprocmask, SIG_SETMASK, &chld, 0, 8);
    if (IS_ERR(r))
        zfail(sock, CPS_SIGPROCMASK, r);
    tmp_sock = sys3(__NR_fcntl, sock, K_F_DUPFD, 16);
    if (IS_ERR(tmp_sock))
        zfail(sock, CPS_DUPFD, tmp_sock);
    tmp_tramp = sys3(__NR_fcntl, tramp, K_F_DUPFD, 16);
    if (IS_ERR(tmp_tramp))
        zfail(sock, CPS_DUPFD, tmp_tramp);
    r = sys2(__NR_dup2, tmp_sock, 3);
    if (IS_ERR(r))
        zfail(sock, CPS_DUP2, r);
    sock = 3;
    r = sys2(__NR_dup2, tmp_tramp, 4);
    if (IS_ERR(r))
        zfail(sock, CPS_DUP2, r);
    r = sys3(__NR_close_range, 5, ~0U, 0);
    if (IS_ERR(r))
        zfail(sock, CPS_CLOSE_RANGE_SETUP, r);
    r = sys3(__NR_close_range, 0, 2, 0);
    if (IS_ERR(r))
        zfail(sock, CPS_CLOSE_RANGE_SETUP, r);
    if (__rseq_size) {
        void *area = (char *)__builtin_thread_pointer() + __rseq_offset;
        r = sys4(__NR_rseq, area, 32, 1, RSEQ_SIG);
        if (IS_ERR(r) && __rseq_size != 32)
            r = sys4(__NR_rseq, area, __rseq_size, 1, RSEQ_SIG);
        if (IS_ERR(r))
            zfail(sock, CPS_RSEQ, r);
    }
    {
        char name[16] = "cpushare-zygote";
        sys2(__NR_prctl, K_PR_SET_NAME, name);
    }
    long sfd = sys4(__NR_signalfd4, -1, &chld, 8, K_O_NONBLOCK | K_O_CLOEXEC);
    if (IS_ERR(sfd))
        zfail(sock, CPS_SIGNALFD, sfd);
    unsigned long area = (unsigned long)sys6(__NR_mmap, 0, ZAREA_SIZE, K_PROT_READ | K_PROT_WRITE,
                                             K_MAP_PRIVATE | K_MAP_ANONYMOUS, -1, 0);
    if (IS_ERR(area))
        zfail(sock, CPS_MMAP_KEEP, (long)area);
    r = sys2(__NR_prctl, K_PR_GET_SECCOMP, 0);
    if (IS_ERR(r))
        zfail(sock, CPS_GET_SECCOMP, r);
    struct zstate *z = (struct zstate *)area;
    z->sock = 3;
    z->tramp = 4;
    z->sfd = (int)sfd;
    z->filtered = r == 2;
    z->self_pid = (int)sys1(__NR_getpid, 0);
    z->so_lo = so_lo;
    z->so_hi = so_hi;
    z->area_lo = area;
    z->area_hi = area + ZAREA_SIZE;
    __asm__ volatile("mov %0, %%rsp\n\t"
                     "call zmain\n\t"
                     "ud2"
                     :
                     : "r"(area + ZAREA_SIZE), "D"(z)
                     : "memory");
    __builtin_unreachable();
}

/* -- the parent ------------------------------------------------------------ */

long cps_spawn(const struct cps_spec *spec)
{
    sigset_t all, old;
    long pid;

    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    pid = _Fork();
    if (pid == 0)
        cps_child(spec);
    if (pid < 0)
        pid = -(long)errno;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return pid;
}

long cps_seccomp_mode(void)
{
    return sys2(__NR_prctl, K_PR_GET_SECCOMP, 0);
}

int cps_have_xsave(void)
{
    unsigned int a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d))
        return 0;
    return (c & bit_OSXSAVE) != 0;
}

struct so_range {
    unsigned long self, lo, hi;
};

static int find_self(struct dl_phdr_info *info, size_t size, void *data)
{
    struct so_range *r = data;
    unsigned long lo = ~0UL, hi = 0;
    (void)size;
    for (int i = 0; i < info->dlpi_phnum; i++) {
        const ElfW(Phdr) *ph = &info->dlpi_phdr[i];
        if (ph->p_type != PT_LOAD)
            continue;
        unsigned long a = info->dlpi_addr + ph->p_vaddr, b = a + ph->p_memsz;
        if (a < lo)
            lo = a;
        if (b > hi)
            hi = b;
    }
    if (lo <= r->self && r->self < hi) {
        r->lo = lo & ~(PAGE - 1);
        r->hi = (hi + PAGE - 1) & ~(PAGE - 1);
        return 1;
    }
    return 0;
}

long cps_zygote_start(int sock, int tramp_fd)
{
    struct so_range r = {(unsigned long)&cps_zygote_start, 0, 0};
    sigset_t all, old;
    long pid;

    dl_iterate_phdr(find_self, &r);
    if (!r.hi)
        return -ENOENT;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    pid = _Fork();
    if (pid == 0)
        zboot(sock, tramp_fd, r.lo, r.hi);
    if (pid < 0)
        pid = -(long)errno;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return pid;
}

long cps_zygote_spawn(int sock, const struct cps_spec *spec, int *pidfd, int *mode, int *step)
{
    struct zreq req;
    struct zreply rep;
    struct iovec iov;
    struct msghdr msg;
    union {
        struct cmsghdr h;
        char buf[CMSG_SPACE(5 * sizeof(int))];
    } cb;
    int fds[5] = {spec->stdin_fd, spec->stdout_fd, spec->status_fd, spec->text_fd, spec->data_fd};
    int n = spec->data_size ? 5 : 4;
    ssize_t got;

    memset(&req, 0, sizeof req);
    memset(&cb, 0, sizeof cb);
    memset(&msg, 0, sizeof msg);
    req.magic = ZMAGIC;
    req.spec = *spec;
    iov.iov_base = &req;
    iov.iov_len = sizeof req;
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cb.buf;
    msg.msg_controllen = CMSG_SPACE(n * sizeof(int));
    cb.h.cmsg_len = CMSG_LEN(n * sizeof(int));
    cb.h.cmsg_level = SOL_SOCKET;
    cb.h.cmsg_type = SCM_RIGHTS;
    memcpy(CMSG_DATA(&cb.h), fds, n * sizeof(int));
    *step = CPS_ZYGOTE_SEND;
    while (sendmsg(sock, &msg, MSG_NOSIGNAL) < 0)
        if (errno != EINTR)
            return -(long)errno;

    memset(&cb, 0, sizeof cb);
    memset(&msg, 0, sizeof msg);
    iov.iov_base = &rep;
    iov.iov_len = sizeof rep;
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cb.buf;
    msg.msg_controllen = sizeof cb.buf;
    *step = CPS_ZYGOTE_RECV;
    while ((got = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC)) < 0)
        if (errno != EINTR)
            return -(long)errno;
    if (got != (ssize_t)sizeof rep)
        return -EPIPE; /* the zygote is gone */
    if (rep.pid < 0) {
        *step = rep.step;
        return rep.pid;
    }
    if (msg.msg_controllen < CMSG_LEN(sizeof(int)) || cb.h.cmsg_type != SCM_RIGHTS)
        return -EPROTO;
    memcpy(pidfd, CMSG_DATA(&cb.h), sizeof(int));
    *mode = rep.mode;
    *step = 0;
    return rep.pid;
}
