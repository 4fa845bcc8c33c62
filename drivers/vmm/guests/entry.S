/* Entry of the stead tiny test guest.
 * The VMM enters in 64-bit long mode at the first byte of the image with:
 *   rdi = vCPU id, rsi = number of vCPUs, rdx = guest address of the command line,
 *   rsp = top of this vCPU's stack (identity-mapped, 16-byte aligned).
 */
    .section .text.entry, "ax"
    .globl _start
    .code64
_start:
    cli
    andq $-16, %rsp
    call guest_main
1:  cli
    hlt
    jmp 1b
