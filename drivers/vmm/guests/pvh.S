/* PVH entry for the tiny guest (the same guest code as the flat image).
 *
 * PVH boot protocol: the loader enters pvh_start in 32-bit protected mode, paging
 * off, flat segments, %ebx = guest-physical address of struct hvm_start_info. This
 * stub builds an identity map of the low 4 GiB (2 MiB pages), enables long mode and
 * calls guest_main(cpu 0, 1 cpu, start_info->cmdline_paddr). Used to boot the same
 * guest in stead's VMM (ELF + PVH note) and in QEMU (-M microvm -kernel).
 */

    .section .note.Xen, "a", @note
    .balign 4
    .long 4                 /* namesz: "Xen\0" */
    .long 4                 /* descsz */
    .long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .balign 4
    .long pvh_start
    .balign 4

    .section .text.entry, "ax"
    .code32
    .globl pvh_start
pvh_start:
    cli
    mov %ebx, %esi                      /* keep start_info */
    /* PML4[0] -> PDPT, PDPT[0..3] -> PD0..PD3, PD entries: 2 MiB identity pages. */
    lea pvh_pdpt, %eax
    or $3, %eax
    mov %eax, pvh_pml4
    lea pvh_pd, %eax
    or $3, %eax
    mov $0, %ecx
1:  mov %eax, pvh_pdpt(,%ecx,8)
    add $0x1000, %eax
    inc %ecx
    cmp $4, %ecx
    jne 1b
    mov $0x83, %eax                     /* present | writable | 2 MiB */
    xor %edx, %edx                      /* high dword of the address */
    mov $0, %ecx
2:  mov %eax, pvh_pd(,%ecx,8)
    mov %edx, pvh_pd+4(,%ecx,8)
    add $0x200000, %eax
    adc $0, %edx
    inc %ecx
    cmp $2048, %ecx
    jne 2b
    mov %cr4, %eax
    or $0x20, %eax                      /* PAE */
    mov %eax, %cr4
    lea pvh_pml4, %eax
    mov %eax, %cr3
    mov $0xc0000080, %ecx               /* EFER */
    rdmsr
    or $0x100, %eax                     /* LME */
    wrmsr
    mov %cr0, %eax
    or $0x80000001, %eax                /* PG | PE */
    mov %eax, %cr0
    lgdt pvh_gdt_desc
    ljmp $0x08, $pvh_long

    .code64
pvh_long:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov %ax, %fs
    mov %ax, %gs
    lea pvh_stack_top(%rip), %rsp
    mov %esi, %esi                      /* zero-extend start_info */
    mov 24(%rsi), %rdx                  /* hvm_start_info.cmdline_paddr */
    xor %edi, %edi                      /* cpu 0 */
    mov $1, %esi                        /* 1 cpu */
    call guest_main
3:  cli
    hlt
    jmp 3b

    .section .rodata
    .balign 8
pvh_gdt:
    .quad 0
    .quad 0x00af9b000000ffff            /* 0x08: 64-bit code */
    .quad 0x00cf93000000ffff            /* 0x10: data */
pvh_gdt_end:
pvh_gdt_desc:
    .word pvh_gdt_end - pvh_gdt - 1
    .long pvh_gdt

    .section .bss
    .balign 4096
pvh_pml4:   .skip 4096
pvh_pdpt:   .skip 4096
pvh_pd:     .skip 4 * 4096
pvh_stack:  .skip 16384
pvh_stack_top:
