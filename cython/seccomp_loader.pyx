# cython: language_level=3
"""cpushare._seccomp: fork a job into the seccomp sandbox (private).

The public face is cpushare.sandbox; this module only does what needs C:
sealed memfds, the fork, and the child's set-up (trampoline.c), which runs
no Python at all.  Failures raise OSError(errno, "call(...): strerror").
"""

import os
import threading

from libc.errno cimport errno
from libc.stdint cimport uint64_t


cdef extern from "loader.h" nogil:
    struct cps_spec:
        int stdin_fd, stdout_fd, status_fd, text_fd, data_fd, tramp_fd
        int mode
        int allow_tsc
        int allow_cpuid
        int xsave
        uint64_t text_start, text_size
        uint64_t data_start, data_size
        uint64_t stack_start, stack_size
        uint64_t entry, stack_top
        uint64_t cpu_soft, cpu_hard
        int in_zygote, zygote_pid
    long cps_spawn(const cps_spec *spec)
    long cps_zygote_start(int sock, int tramp_fd)
    long cps_zygote_spawn(int sock, const cps_spec *spec, int *pidfd, int *mode, int *step)
    int CPS_EXITED
    long cps_seccomp_mode()
    int cps_have_xsave()
    const unsigned char cps_tramp_begin[]
    const unsigned char cps_tramp_end[]
    int CPS_MODE_STRICT, CPS_MODE_FILTER, CPS_NSTEPS


cdef extern from "<sys/mman.h>" nogil:
    int memfd_create(const char *name, unsigned int flags)
    int MFD_CLOEXEC, MFD_ALLOW_SEALING

cdef extern from "<fcntl.h>" nogil:
    int fcntl(int fd, int cmd, ...)
    int F_ADD_SEALS, F_SEAL_SEAL, F_SEAL_SHRINK, F_SEAL_GROW, F_SEAL_WRITE

from posix.types cimport off_t
from libc.stddef cimport size_t
cdef extern from "<unistd.h>" nogil:
    ctypedef long ssize_t
    int ftruncate(int fd, long length)
    ssize_t pwrite(int fd, const void *buf, size_t count, long offset)
    int close(int fd)



DEF MFD_EXEC = 0x10        # Linux 6.3: executable memfd even under vm.memfd_noexec
DEF EINVAL = 22

MODE_STRICT = CPS_MODE_STRICT
MODE_FILTER = CPS_MODE_FILTER
RECORD_SIZE = 8
REPLY_SIZE = 16


def parse_reply(bytes msg):
    """A zygote reply: (pid or -errno, step, mode)."""
    if len(msg) != REPLY_SIZE:
        raise ValueError(f"zygote reply of {len(msg)} bytes, expected {REPLY_SIZE}")
    return (int.from_bytes(msg[0:8], "little", signed=True),
            int.from_bytes(msg[8:12], "little", signed=True),
            int.from_bytes(msg[12:16], "little", signed=True))
EXITED = CPS_EXITED
EXIT_RECORD_SIZE = 24

# What each set-up step of the child is, for messages (see loader.h).
STEPS = (
    "ready",
    "rt_sigaction(SIG_DFL)",
    "rt_sigprocmask(SIG_SETMASK, {})",
    "fcntl(F_DUPFD, 16)",
    "dup2(job descriptor)",
    "close_range(6, ~0U)",
    "setrlimit(RLIMIT_CPU)",
    "setrlimit(RLIMIT_CORE, 0)",
    "setrlimit(RLIMIT_FSIZE, 0)",
    "setrlimit(RLIMIT_NPROC, 0)",
    "setrlimit(RLIMIT_NOFILE, 2)",
    "prctl(PR_SET_TSC, PR_TSC_SIGSEGV)",
    "prctl(PR_SET_NO_NEW_PRIVS, 1)",
    "getpid()",
    "mmap(keep area)",
    "mmap(keep area) placement above the job's address range",
    "mmap(trampoline, PROT_READ|PROT_EXEC)",
    "mmap(trampoline parameters, PROT_READ|PROT_WRITE)",
    "close(trampoline memfd)",
    "munmap(below the keep area)",
    "munmap(above the keep area)",
    "mmap(text, PROT_READ|PROT_EXEC)",
    "mmap(data+bss, PROT_READ|PROT_WRITE)",
    "mmap(stack, PROT_READ|PROT_WRITE)",
    "arch_prctl(ARCH_SET_FS, 0)",
    "arch_prctl(ARCH_SET_GS, 0)",
    "write(status pipe, ready)",
    "close_range(2, ~0U)",
    "prctl(PR_SET_SECCOMP, SECCOMP_MODE_STRICT)",
    "prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER)",
    "fork()",
    "rseq(RSEQ_FLAG_UNREGISTER)",
    "prctl(PR_SET_PDEATHSIG, SIGKILL)",
    "sendmsg(zygote socket)",
    "recvmsg(zygote socket)",
    "signalfd4(SIGCHLD)",
    "prctl(PR_GET_SECCOMP)",
    "arch_prctl(ARCH_SET_CPUID, 0)",
)


NSTEPS = CPS_NSTEPS  # len(STEPS) must match loader.h's enum


def step_name(int step):
    """The system call behind a set-up step number of a status record."""
    if 0 <= step < len(STEPS):
        return STEPS[step]
    return f"unknown set-up step {step}"


cdef _oserror(int err, str call):
    return OSError(err, f"{call}: {os.strerror(err)}")


def seccomp_mode():
    """prctl(PR_GET_SECCOMP) in the calling thread: 0 none, 2 filter."""
    cdef long r = cps_seccomp_mode()
    if r < 0:
        raise _oserror(<int>-r, "prctl(PR_GET_SECCOMP)")
    return r


def sealed_memfd(str name, const unsigned char[:] content, unsigned long size, bint executable):
    """A memfd of `size` bytes starting with `content`, sealed against any
    change (write, grow, shrink, more seals).  Returns the descriptor
    (close-on-exec)."""
    cdef bytes bname = name.encode()
    cdef const char *cname = bname
    cdef int fd
    cdef unsigned int flags = MFD_CLOEXEC | MFD_ALLOW_SEALING
    cdef size_t n = content.shape[0]
    cdef size_t done = 0
    cdef ssize_t w
    cdef const unsigned char *buf = &content[0] if n else NULL
    if n > size:
        raise ValueError(f"memfd {name!r}: {n} bytes of content do not fit in {size}")
    with nogil:
        fd = memfd_create(cname, flags | (MFD_EXEC if executable else 0))
    if fd < 0 and executable and errno == EINVAL:  # a kernel before MFD_EXEC
        fd = memfd_create(cname, flags)
    if fd < 0:
        raise _oserror(errno, f"memfd_create({name!r})")
    try:
        if ftruncate(fd, size) < 0:
            raise _oserror(errno, f"ftruncate(memfd {name!r}, {size})")
        with nogil:
            while done < n:
                w = pwrite(fd, buf + done, n - done, done)
                if w <= 0:
                    break
                done += w
        if done < n:
            raise _oserror(errno or EINVAL, f"pwrite(memfd {name!r}, {n} bytes)")
        if fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE | F_SEAL_SEAL) < 0:
            raise _oserror(errno, f"fcntl(memfd {name!r}, F_ADD_SEALS)")
    except BaseException:
        close(fd)
        raise
    return fd


_tramp_lock = threading.Lock()
_tramp = [-1, 0]   # fd, pid that made it


def trampoline_memfd():
    """The sealed memfd holding the trampoline's code (one per process)."""
    cdef size_t size = cps_tramp_end - cps_tramp_begin
    with _tramp_lock:
        if _tramp[0] < 0 or _tramp[1] != os.getpid():
            if size > 4096:
                raise RuntimeError(f"trampoline is {size} bytes, more than its page")
            code = bytes(<const unsigned char[:size]> cps_tramp_begin)
            _tramp[0] = sealed_memfd("cpushare-trampoline", code, 4096, True)
            _tramp[1] = os.getpid()
        return _tramp[0]


_xsave = cps_have_xsave()


cdef int _fill(cps_spec *s, int stdin_fd, int stdout_fd, int status_fd, int text_fd, int data_fd,
               text, data, stack, uint64_t entry, uint64_t stack_top,
               uint64_t cpu_soft, uint64_t cpu_hard, bint allow_tsc, bint allow_cpuid,
               int mode) except -1:
    if mode not in (CPS_MODE_STRICT, CPS_MODE_FILTER):
        raise ValueError(f"unknown seccomp mode {mode}")
    s.stdin_fd = stdin_fd
    s.stdout_fd = stdout_fd
    s.status_fd = status_fd
    s.text_fd = text_fd
    s.data_fd = data_fd
    s.tramp_fd = -1
    s.mode = mode
    s.allow_tsc = allow_tsc
    s.allow_cpuid = allow_cpuid
    s.xsave = _xsave
    s.text_start, s.text_size = text
    if data is None:
        s.data_start = s.data_size = 0
        s.data_fd = -1
    else:
        s.data_start, s.data_size = data
    s.stack_start, s.stack_size = stack
    s.entry = entry
    s.stack_top = stack_top
    s.cpu_soft = cpu_soft
    s.cpu_hard = cpu_hard
    s.in_zygote = 0
    s.zygote_pid = 0
    return 0


def spawn(*, int stdin_fd, int stdout_fd, int status_fd, int text_fd, int data_fd,
          text, data, stack, uint64_t entry, uint64_t stack_top,
          uint64_t cpu_soft, uint64_t cpu_hard, bint allow_tsc, bint allow_cpuid,
          int mode):
    """Fork a job from this process.  text, data and stack are (start,
    size) pairs (data None when the image has none); the child reports on
    status_fd (8-byte records: see STEPS) and closes it right before
    seccomp.  Returns the pid."""
    cdef cps_spec s
    cdef long pid
    _fill(&s, stdin_fd, stdout_fd, status_fd, text_fd, data_fd, text, data, stack,
          entry, stack_top, cpu_soft, cpu_hard, allow_tsc, allow_cpuid, mode)
    s.tramp_fd = trampoline_memfd()
    with nogil:
        pid = cps_spawn(&s)
    if pid < 0:
        raise _oserror(<int>-pid, "fork()")
    return pid


def zygote_start(int sock):
    """Fork the zygote, which serves requests on sock (a SOCK_SEQPACKET
    socket) until its other end closes.  Its first message on the socket is
    a reply (see parse_reply): pid 0 when it is ready, or -errno and the
    step that failed.  Returns its pid."""
    cdef int tramp = trampoline_memfd()
    cdef long pid
    with nogil:
        pid = cps_zygote_start(sock, tramp)
    if pid < 0:
        raise _oserror(<int>-pid, "fork(zygote)")
    return pid


def zygote_spawn(int sock, *, int stdin_fd, int stdout_fd, int status_fd, int text_fd,
                 int data_fd, text, data, stack, uint64_t entry, uint64_t stack_top,
                 uint64_t cpu_soft, uint64_t cpu_hard, bint allow_tsc, bint allow_cpuid,
                 int mode):
    """Have the zygote fork a job (one request at a time per socket: the
    caller serialises).  The zygote writes an exit record (EXITED, wait
    status, user and system microseconds) on status_fd when the job ends.
    Returns (pid, pidfd, mode)."""
    cdef cps_spec s
    cdef long pid
    cdef int pidfd = -1, used_mode = 0, step = 0
    _fill(&s, stdin_fd, stdout_fd, status_fd, text_fd, data_fd, text, data, stack,
          entry, stack_top, cpu_soft, cpu_hard, allow_tsc, allow_cpuid, mode)
    with nogil:
        pid = cps_zygote_spawn(sock, &s, &pidfd, &used_mode, &step)
    if pid < 0:
        raise _oserror(<int>-pid, step_name(step))
    return pid, pidfd, used_mode
