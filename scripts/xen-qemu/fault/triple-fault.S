/*
 * triple-fault.S: a PVH "kernel" that triple-faults at its first instruction, on purpose.
 * scripts/e2e.sh --induce-fault boots it as the x86 PVH DomU to test, with a real fault of
 * Xen's HVM emulation, how the harness tells an emulator fault before any check (retried) from
 * a fault after one (a failure). Xen enters it in 32-bit protected mode with paging off
 * (XEN_ELFNOTE_PHYS32_ENTRY). It loads an empty IDT and executes ud2: the #UD cannot be
 * delivered, nor the #GP and the #DF that follow, so the vCPU triple-faults and Xen prints
 * "d<N>v0 Triple fault - invoking HVM shutdown action 1", as for the emulator's own faults.
 * Built by build-initrd.sh with the host's binutils (fault/triple-fault.ld).
 */
        .section .note.Xen, "a", @note
        .balign 4
        .long 4, 4, 18          /* namesz, descsz, type XEN_ELFNOTE_PHYS32_ENTRY */
        .asciz "Xen"
        .long entry

        .text
        .code32
        .globl entry
entry:  lidt  empty_idt
        ud2
        .balign 8
empty_idt:
        .word 0                 /* limit 0: no vector is deliverable */
        .long 0
