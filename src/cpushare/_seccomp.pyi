# Type stub of the Cython extension cpushare._seccomp (cython/seccomp_loader.pyx).
# Private: use cpushare.sandbox.  Every failure raises OSError(errno, "call(...): strerror").

MODE_STRICT: int
MODE_FILTER: int
REPLY_SIZE: int         # bytes of a zygote reply (pid or -errno, step, mode)
RECORD_SIZE: int        # bytes of a set-up record on the status pipe (step, errno)
EXITED: int             # the step of the zygote's exit record
EXIT_RECORD_SIZE: int   # bytes of an exit record (EXITED, wait status, user us, system us)
NSTEPS: int
STEPS: tuple[str, ...]  # what each set-up step of the child calls

def step_name(step: int) -> str: ...
def parse_reply(msg: bytes) -> tuple[int, int, int]: ...
def seccomp_mode() -> int: ...
def sealed_memfd(name: str, content: bytes, size: int, executable: bool) -> int: ...
def trampoline_memfd() -> int: ...
def spawn(*, stdin_fd: int, stdout_fd: int, status_fd: int, text_fd: int, data_fd: int,
          text: tuple[int, int], data: tuple[int, int] | None, stack: tuple[int, int],
          entry: int, stack_top: int, cpu_soft: int, cpu_hard: int, allow_tsc: bool,
          allow_cpuid: bool, mode: int) -> int: ...
def zygote_start(sock: int) -> int: ...
def zygote_spawn(sock: int, *, stdin_fd: int, stdout_fd: int, status_fd: int, text_fd: int,
                 data_fd: int, text: tuple[int, int], data: tuple[int, int] | None,
                 stack: tuple[int, int], entry: int, stack_top: int, cpu_soft: int,
                 cpu_hard: int, allow_tsc: bool, allow_cpuid: bool,
                 mode: int) -> tuple[int, int, int]: ...
