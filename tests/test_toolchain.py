"""`cpushare cc`: C sources -> bytecode images.

Images are checked by parsing them and by running them in the seller's
sandbox (cpushare.sandbox, strict mode or its filter equivalent).  The
linked ELF that `--save-elf` keeps runs as a static executable too.
"""

from __future__ import annotations

import argparse
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from cpushare import bytecode, sandbox
from cpushare.bytecode import DEFAULT_STACK_SIZE, DEFAULT_TEXT_ADDRESS, PAGE, page_up
from cpushare.toolchain import ToolchainError, build, cli, read_elf

ROOT = Path(__file__).resolve().parent.parent
SRC = str(ROOT / "src")
EXAMPLES = ROOT / "examples"


def cc(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `cpushare cc ARGV` as a command."""
    env = dict(os.environ, PYTHONPATH=SRC)
    return subprocess.run([sys.executable, "-m", "cpushare", "cc", *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def cc_main(*argv: str) -> int:
    """`cpushare cc ARGV` through the subcommand's own configure/main."""
    parser = argparse.ArgumentParser(prog="cpushare cc")
    cli.configure(parser)
    return cli.main(parser.parse_args(list(argv)))


def source(tmp_path: Path, text: str, name: str = "job.c") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def run_elf(path: Path, input: bytes = b"") -> subprocess.CompletedProcess:
    return subprocess.run([str(path)], input=input, capture_output=True, timeout=30)


LIMITS = sandbox.Limits(cpu_seconds=5, wall_seconds=20)


def run(img: bytecode.Image, input: bytes = b"") -> sandbox.Result:
    """Run an image as a seller would (after a round trip through its bytes)."""
    return sandbox.run(bytecode.parse(img.pack()), input=input, limits=LIMITS)


def exited(result: sandbox.Result, status: int, output: bytes | None = None) -> None:
    assert (result.reason, result.exit_status) == ("exit", status), result.describe()
    if output is not None:
        assert result.output == output


def text_end(img: bytecode.Image) -> int:
    return img.text_address + len(img.text)


# -- the examples ----------------------------------------------------------------

def test_hello_example_builds_and_has_only_text(tmp_path):
    out = tmp_path / "hello.bin"
    img = build([EXAMPLES / "hello" / "hello.c"], out, elf_output=tmp_path / "hello.elf")
    assert bytecode.load(out) == img
    assert img.text_address == DEFAULT_TEXT_ADDRESS
    assert img.entry == DEFAULT_TEXT_ADDRESS  # crt0's _start comes first
    assert b"hello, world\n" in img.text  # .rodata goes with the text
    assert img.data == b"" and img.data_address == 0 and img.bss_size == 0
    assert img.stack_size == DEFAULT_STACK_SIZE
    assert [r.name for r in img.regions()] == ["text", "stack"]
    exited(run(img), 0, b"hello, world\n")
    proc = run_elf(tmp_path / "hello.elf")
    assert (proc.returncode, proc.stdout) == (0, b"hello, world\n")


def test_echo_example_builds_with_bss(tmp_path):
    img = build([EXAMPLES / "echo" / "echo.c"], tmp_path / "echo.bin")
    assert img.data == b""
    assert img.bss_size == 64 * 1024
    assert img.data_address == page_up(text_end(img))
    payload = bytes(range(256)) * 1000
    exited(run(img, payload), 0, payload)
    exited(run(img), 0, b"")


def test_examples_have_a_readme():
    for name in ("hello", "echo"):
        assert (EXAMPLES / name / "README").read_text().strip()


# -- layout --------------------------------------------------------------------

DATA_AND_BSS = r"""
#include <cpushare.h>
char marker[] = "DATA-MARKER";
long table[3] = {1, 2, 3};
static char zeros[20000];
const char rodata[] = "RODATA-MARKER";
int main(void)
{
    zeros[19999] = (char)table[2];
    cs_write_all(CS_STDOUT, marker, strlen(marker));
    cs_write_all(CS_STDOUT, rodata, strlen(rodata));
    return zeros[19999] + 40;
}
"""


def test_data_and_bss_are_placed_page_aligned_after_text(tmp_path):
    img = build([source(tmp_path, DATA_AND_BSS)])
    assert img.data_address % PAGE == 0
    assert img.data_address == page_up(text_end(img))
    assert b"DATA-MARKER\0" in img.data
    assert struct.pack("<3q", 1, 2, 3) in img.data
    assert b"RODATA-MARKER" in img.text and b"RODATA-MARKER" not in img.data
    assert img.bss_size >= 20000
    regions = {r.name: r for r in img.regions()}
    assert regions["data"].size == page_up(len(img.data) + img.bss_size)
    assert bytecode.parse(img.pack()) == img
    exited(run(img), 43, b"DATA-MARKERRODATA-MARKER")


def test_bss_is_zero_and_fully_mapped(tmp_path):
    img = build([source(tmp_path, r"""
        static long big[300000];            /* 2.4 MB of bss */
        long initialised = 5;
        int main(void)
        {
            for (long i = 0; i < 300000; i++)
                if (big[i]) return 1;
            big[0] = big[299999] = initialised;
            return (int)(big[0] + big[299999]);
        }
    """)])
    assert img.bss_size >= 300000 * 8 and len(img.data) == 8
    exited(run(img), 10)


def test_text_only_program(tmp_path):
    img = build([source(tmp_path, "int main(void) { return 7; }")])
    assert img.data == b"" and img.bss_size == 0 and img.data_address == 0
    exited(run(img), 7, b"")


def test_only_two_loadable_segments(tmp_path):
    build([source(tmp_path, DATA_AND_BSS)], elf_output=tmp_path / "job.elf")
    elf = read_elf((tmp_path / "job.elf").read_bytes())
    loads = [s for s in elf.segments if s.type == 1 and s.memsz]
    assert [(s.flags, s.vaddr) for s in loads][0] == (5, DEFAULT_TEXT_ADDRESS)
    assert loads[1].flags == 6 and len(loads) == 2


def test_several_sources_and_exit_status_is_mains_return_value(tmp_path):
    a = source(tmp_path, "int twice(int x);\nint main(void) { return twice(21) + 200; }", "a.c")
    b = source(tmp_path, "int twice(int x) { return 2 * x; }", "b.c")
    exited(run(build([a, b])), (42 + 200) & 0xFF)


def test_stack_size_is_rounded_to_a_page_and_bounded(tmp_path):
    src = source(tmp_path, "int main(void) { return 0; }")
    assert build([src], stack_size=64 * 1024).stack_size == 64 * 1024
    assert build([src], stack_size=5000).stack_size == 2 * PAGE
    with pytest.raises(ToolchainError, match="exceeds the maximum"):
        build([src], stack_size=bytecode.MAX_STACK + 1)
    with pytest.raises(ToolchainError, match="positive"):
        build([src], stack_size=0)


def test_the_stack_size_reaches_the_job(tmp_path):
    # about 100 KiB of stack: fits in 1 MiB, overflows 64 KiB into the guard page
    src = source(tmp_path, r"""
        __attribute__((noinline)) static int down(int n)
        {
            volatile char frame[1000];
            frame[0] = (char)n;
            return n ? down(n - 1) + frame[0] - (char)n : 0;
        }
        int main(void) { return down(100) + 3; }
    """)
    exited(run(build([src], stack_size=1 << 20)), 3)
    small = run(build([src], stack_size=64 << 10))
    assert (small.reason, small.signal) == ("fault", 11), small.describe()


# -- the runtime and cpushare.h ------------------------------------------------

RUNTIME_CHECKS = r"""
#include <cpushare.h>
struct big { char c[1000]; };
static struct big a, b;
static char buf[64];
int main(void)
{
    int fail = 0;
    for (int i = 0; i < 1000; i++) a.c[i] = (char)i;
    b = a;                                   /* gcc calls memcpy */
    if (memcmp(&a, &b, sizeof a)) fail |= 1;
    memset(buf, 'x', 10); buf[10] = 0;
    if (strlen(buf) != 10 || strcmp(buf, "xxxxxxxxxx")) fail |= 2;
    memcpy(buf, "0123456789", 11);
    memmove(buf + 2, buf, 8);                /* overlapping, forwards */
    if (strcmp(buf, "0101234567")) fail |= 4;
    memmove(buf, buf + 2, 9);                /* overlapping, backwards */
    if (strcmp(buf, "01234567")) fail |= 8;
    if (memcmp("abc", "abd", 3) >= 0 || memcmp("abd", "abc", 3) <= 0) fail |= 16;
    if (strcmp("a", "ab") >= 0 || strcmp("b", "a") <= 0) fail |= 32;
    return fail;
}
"""


@pytest.mark.parametrize("opt", ["-O0", "-O2", "-O3"])
def test_runtime_mem_and_str_functions(tmp_path, opt):
    exited(run(build([source(tmp_path, RUNTIME_CHECKS)], cflags=[opt])), 0, b"")


MESSAGES = r"""
#include <cpushare.h>
static char buf[256];
int main(void)
{
    long n;
    while ((n = cs_recv_msg(buf, sizeof buf)) >= 0) {
        for (long i = 0; i < n; i++)
            buf[i] = (char)(buf[i] ^ 0x20);
        if (cs_send_msg(buf, (size_t)n) < 0)
            return 2;
    }
    return n == -2 ? 3 : 0;
}
"""


def msg(body: bytes) -> bytes:
    return struct.pack("<I", len(body)) + body


def test_length_prefixed_messages(tmp_path):
    img = build([source(tmp_path, MESSAGES)])
    exited(run(img, msg(b"hello") + msg(b"") + msg(b"A" * 256)), 0,
           msg(b"HELLO") + msg(b"") + msg(b"a" * 256))
    exited(run(img, msg(b"x" * 257)), 3, b"")
    exited(run(img, msg(b"abc")[:-1]), 0, b"")


def test_read_exact_and_write_all(tmp_path):
    img = build([source(tmp_path, r"""
        #include <cpushare.h>
        static char buf[100000];
        int main(void)
        {
            if (cs_read_exact(CS_STDIN, buf, sizeof buf) != (long)sizeof buf) return 1;
            if (cs_write_all(CS_STDOUT, buf, sizeof buf) != (long)sizeof buf) return 2;
            return cs_read_exact(CS_STDIN, buf, 1) == -1 ? 0 : 3;
        }
    """)])
    data = os.urandom(100000)
    exited(run(img, data), 0, data)
    exited(run(img, data[:-1]), 1, b"")


def test_cs_exit_ends_the_job_with_its_status(tmp_path):
    img = build([source(tmp_path, """
        #include <cpushare.h>
        static void deep(int n) { if (n == 0) cs_exit(9); deep(n - 1); }
        int main(void) { deep(10); return 1; }
    """)])
    exited(run(img), 9)


def test_exit_goes_through_the_exit_syscall_not_exit_group(tmp_path):
    img = build([source(tmp_path, "int main(void) { return 0; }")], elf_output=tmp_path / "job.elf")
    dump = subprocess.run(["objdump", "-d", str(tmp_path / "job.elf")], capture_output=True,
                          text=True, check=True).stdout
    start = dump.split("<_start>:")[1].split("\n\n")[0]
    assert "mov    $0x3c,%eax" in start and "$0xe7" not in start  # 60, never 231
    assert "call" in start and "<main>" in start
    assert img.entry == DEFAULT_TEXT_ADDRESS
    exited(run(img), 0)  # the sandbox kills exit_group, so this shows exit was used


# -- failures ------------------------------------------------------------------

def test_compile_error_is_passed_through_and_exits_1(tmp_path, capsys):
    bad = source(tmp_path, "int main(void) { return undeclared_thing; }\n", "bad.c")
    out = tmp_path / "bad.bin"
    assert cc_main("-o", str(out), str(bad)) == 1
    err = capsys.readouterr().err
    assert "bad.c:1:" in err and "undeclared_thing" in err  # gcc's own words
    assert f"cpushare cc: error: compiling {bad}: gcc failed with exit status 1" in err
    assert not out.exists()


def test_missing_main_gives_a_clear_message(tmp_path, capsys):
    lib = source(tmp_path, "int helper(void) { return 1; }\n", "lib.c")
    assert cc_main(str(lib)) == 1
    err = capsys.readouterr().err
    assert f"cpushare cc: error: {lib}: no main function: a CPUShare program defines " \
           "`int main(void)`" in err
    with pytest.raises(ToolchainError, match="no main function"):
        build([lib])


def test_missing_source_is_named(tmp_path):
    with pytest.raises(ToolchainError, match=r"nope\.c: no such source file"):
        build([tmp_path / "nope.c"])
    with pytest.raises(ToolchainError, match="no source files"):
        build([])


def test_thread_local_storage_is_refused(tmp_path):
    src = source(tmp_path, "_Thread_local int x = 1;\nint main(void) { return x; }\n")
    with pytest.raises(ToolchainError, match="thread-local storage"):
        build([src])


def test_constructors_are_refused(tmp_path):
    src = source(tmp_path, "int v;\n__attribute__((constructor)) static void init(void) { v = 1; }\n"
                           "int main(void) { return v; }\n")
    with pytest.raises(ToolchainError, match=r"\.init_array holds constructors"):
        build([src])


def test_read_elf_refuses_what_is_not_an_executable():
    with pytest.raises(ToolchainError, match="too short"):
        read_elf(b"\x7fELF")
    with pytest.raises(ToolchainError, match="bad magic"):
        read_elf(b"MZ" + b"\0" * 100)


# -- the command -----------------------------------------------------------------

def test_cli_passes_gcc_options_and_names_the_output(tmp_path, capsys, monkeypatch):
    src = source(tmp_path, "int main(void) { return VALUE; }\n", "prog.c")
    monkeypatch.chdir(tmp_path)
    assert cc_main("-O0", "-DVALUE=5", "-Wall", "-std=c11", "--stack-size", "64K",
                   "--save-elf", "prog.elf", str(src)) == 0
    img = bytecode.load(tmp_path / "prog.bin")  # default name: the first source's, .bin
    assert img.stack_size == 64 * 1024
    assert run_elf(tmp_path / "prog.elf").returncode == 5
    exited(run(img), 5)
    assert f"prog.bin: text {len(img.text)}, data 0, bss 0" in capsys.readouterr().err


def test_cli_refuses_a_bad_stack_size(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        cc_main("--stack-size", "lots", str(source(tmp_path, "int main(void){return 0;}")))
    assert info.value.code == 2
    assert "size 'lots' is not a number" in capsys.readouterr().err


def test_cpushare_cc_command(tmp_path):
    proc = cc("-o", "hello.bin", str(EXAMPLES / "hello" / "hello.c"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert bytecode.load(tmp_path / "hello.bin").entry == DEFAULT_TEXT_ADDRESS
    bad = source(tmp_path, "int main(void) { syntax error }\n", "bad.c")
    proc = cc(str(bad), cwd=tmp_path)
    assert proc.returncode == 1
    assert "bad.c:1:" in proc.stderr and "cpushare cc: error: compiling" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_shows_gcc_warnings_and_still_builds(tmp_path, capsys):
    src = source(tmp_path, "int main(void) { int unused; return 0; }\n", "warn.c")
    assert cc_main("-Wall", "-o", str(tmp_path / "warn.bin"), str(src)) == 0
    err = capsys.readouterr().err
    assert "warn.c:1:" in err and "unused" in err and "-Wunused-variable" in err
    assert bytecode.load(tmp_path / "warn.bin")
    assert cc_main("-Wall", "-Werror", "-o", str(tmp_path / "warn.bin"), str(src)) == 1


def test_a_buyers_own_strlen_replaces_the_runtimes(tmp_path):
    img = build([source(tmp_path, r"""
        #include <cpushare.h>
        size_t strlen(const char *s) { (void)s; return 77; }
        int main(void) { return (int)strlen("abc"); }
    """)], cflags=["-fno-builtin"])
    exited(run(img), 77)
