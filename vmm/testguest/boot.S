/*
 * wanmig test guest: multiboot (v1) entry in 32-bit protected mode, identity
 * map the first 64 GiB with 2 MiB pages, enter long mode, call guest_main.
 *
 * The header uses the multiboot "address fields" (flag bit 16), so any
 * multiboot loader (wanmig, QEMU -kernel, GRUB) loads the image without
 * parsing ELF.
 */
#define MB_MAGIC 0x1BADB002
#define MB_FLAGS 0x00010003 /* page-aligned modules, memory info, address fields */
#define NR_PDS 64           /* page directories: 64 x 1 GiB */

    .section .multiboot, "a"
    .align 4
mb_header:
    .long MB_MAGIC
    .long MB_FLAGS
    .long -(MB_MAGIC + MB_FLAGS)
    .long mb_header
    .long __load_start
    .long __load_end
    .long __bss_end
    .long entry32

    .section .text.entry, "ax"
    .code32
    .global entry32
entry32:
    cli
    movl %eax, boot_magic
    movl %ebx, boot_info

    /* PML4[0] -> PDPT */
    movl $pdpt, %eax
    orl $0x3, %eax
    movl %eax, pml4

    /* PDPT[i] -> PD i */
    xorl %ecx, %ecx
1:  movl %ecx, %eax
    shll $12, %eax
    addl $pds, %eax
    orl $0x3, %eax
    movl %eax, pdpt(,%ecx,8)
    incl %ecx
    cmpl $NR_PDS, %ecx
    jne 1b

    /* PD entry i maps i * 2 MiB (present, writable, 2 MiB page) */
    xorl %ecx, %ecx
2:  movl %ecx, %eax
    shll $21, %eax
    orl $0x83, %eax
    movl %eax, pds(,%ecx,8)
    movl %ecx, %eax
    shrl $11, %eax
    movl %eax, pds+4(,%ecx,8)
    incl %ecx
    cmpl $(NR_PDS * 512), %ecx
    jne 2b

    movl $pml4, %eax
    movl %eax, %cr3
    movl %cr4, %eax
    orl $0x20, %eax         /* PAE */
    movl %eax, %cr4
    movl $0xC0000080, %ecx  /* EFER */
    rdmsr
    orl $0x100, %eax        /* LME */
    wrmsr
    movl %cr0, %eax
    orl $0x80000001, %eax   /* PG | PE */
    movl %eax, %cr0
    lgdt gdt_ptr
    ljmp $0x08, $entry64

    .code64
entry64:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    leaq stack_top(%rip), %rsp
    movl boot_magic(%rip), %edi
    movl boot_info(%rip), %esi
    call guest_main
3:  cli
    hlt
    jmp 3b

    .section .rodata
    .align 16
gdt:
    .quad 0
    .quad 0x00AF9A000000FFFF /* 0x08: 64-bit code */
    .quad 0x00CF92000000FFFF /* 0x10: data */
gdt_end:
gdt_ptr:
    .word gdt_end - gdt - 1
    .long gdt

    .section .data
    .align 4
boot_magic: .long 0
boot_info:  .long 0

    .section .bss
    .align 4096
pml4:   .skip 4096
pdpt:   .skip 4096
pds:    .skip 4096 * NR_PDS
stack:  .skip 65536
stack_top:
