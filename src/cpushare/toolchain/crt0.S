/*
 * crt0.S - the entry point of a CPUShare bytecode image.
 *
 * The loader jumps here with %rsp inside the image's stack and nothing
 * else set up.  _start aligns the stack as the x86-64 ABI wants at a call,
 * calls main, and passes its return value to the raw exit system call (60).
 * Not exit_group (231): seccomp strict mode allows exit only.
 *
 * The linker script puts .text.cpushare_start first in the text.
 */
	.section .text.cpushare_start, "ax", @progbits
	.globl	_start
	.type	_start, @function
_start:
	xorl	%ebp, %ebp
	andq	$-16, %rsp
	call	main
	movl	%eax, %edi
1:	movl	$60, %eax
	syscall
	jmp	1b
	.size	_start, . - _start

	.section .note.GNU-stack, "", @progbits
