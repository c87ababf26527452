/* The job's side of cpushare._seccomp: see loader.h for the sequence.
 *
 * Everything from cps_child() on runs in the forked child, which shares
 * nothing with the parent but a copy of its memory: only raw system calls
 * (no libc, no errno, no TLS, so no stack protector either) and no heap.
 */
#define _GNU_SOURCE
#include <cpuid.h>
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
#define K_PR_GET_SECCOMP 21
#define K_PR_SET_SECCOMP 22
#define K_PR_SET_TSC 26
#define K_PR_TSC_SIGSEGV 2
#define K_PR_SET_NO_NEW_PRIVS 38
#define K_ARCH_SET_GS 0x1001
#define K_ARCH_SET_FS 0x1002
#define K_RLIMIT_CPU 0
#define K_RLIMIT_FSIZE 1
#define K_RLIMIT_CORE 4
#define K_RLIMIT_NPROC 6
#define K_RLIMIT_NOFILE 7
#define K_SIGKILL 9
#define K_SIGUSR1 10
#define K_SIGSTOP 19

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
 * page 1: parameters (rw-)
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

#define XSTR(x) #x
#define STR(x) XSTR(x)

/* The trampoline.  Position independent, no stack until the job's own:
 *   for each step: rax = syscall(nr, a1..a6); an error writes the step's id
 *   and errno to fd 2, sends SIGUSR1 to itself (the status pipe is closed
 *   by the time seccomp runs, so that is how a failing seccomp shows) and
 *   exits 127;
 *   then XRSTOR (or FXRSTOR) the zeroed area, rsp = stack top, every other
 *   register zero, rflags 0x202, jump to the entry. */
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
    "5:  mov .Ltb+4096+" STR(P_STACK_TOP) "(%rip), %rsp\n"
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

    /* Signals: default actions (Python ignores SIGPIPE), nothing blocked. */
    for (i = 1; i <= 64; i++) {
        struct k_sigaction sa = {0, 0, 0, 0};
        if (i == K_SIGKILL || i == K_SIGSTOP)
            continue;
        sys4(__NR_rt_sigaction, i, &sa, 0, 8);
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
    if (s->mode == CPS_MODE_FILTER) {
        r = sys6(__NR_prctl, K_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0, 0);
        if (IS_ERR(r))
            fail(status, CPS_PRCTL_NO_NEW_PRIVS, r);
    }
    /* Restartable sequences: glibc registered an area in this thread's TLS,
     * which is about to be unmapped; the kernel would then kill the job
     * with SIGSEGV on its next preemption.  Unregister it. */
    if (__rseq_size) {
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
