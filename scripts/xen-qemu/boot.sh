#!/usr/bin/env bash
# boot.sh ARCH DEBS OUT LOG TIMEOUT "DOM0 WORDS": boot the Xen and the Dom0 kernel of DEBS (a
# fetch-debs.sh directory: Debian 12's Xen 4.17 and Linux 6.1, or Debian 13's Xen 4.20 and Linux
# 6.12) with OUT/dom0.cpio from build-initrd.sh under QEMU TCG, serial to LOG with host-relative
# timestamps, killed after TIMEOUT seconds. Exits with QEMU's status (124: timed out).
# DOM0 WORDS are appended to the Dom0 kernel command line; they must not contain commas (QEMU's
# multiboot -initrd splits modules on them).
# Adapted from the reference recipe shared/xen-qemu/{x86/run-x86.sh,arm/run-arm.sh}.
set -euo pipefail
ARCH=${1:?usage: boot.sh x86_64|arm64 DEBS OUT LOG TIMEOUT "dom0 words"}
DEBS=${2:?} OUT=${3:?} LOG=${4:?} TIMEOUT=${5:?} WORDS=${6:-}
KVER=$(cat "$DEBS/KVER")
XEN=$(cat "$DEBS/XEN")
KERNEL=$DEBS/stage/boot/vmlinuz-$KVER
case $WORDS in *,*) echo "boot.sh: no commas allowed in the Dom0 words: $WORDS" >&2; exit 2 ;; esac
MEM=3072 # Dom0 1 GiB + two 512 MiB DomUs + Xen, with room
DOM0_ARGS="console=hvc0 earlyprintk=xen rdinit=/init $WORDS"

stamp() { perl -MTime::HiRes=time -ne 'BEGIN { $| = 1; $t0 = time } printf("[%7.2f] %s", time - $t0, $_)'; }

echo "host_start $(date +%s.%N) arch=$ARCH release=$(cat "$DEBS/RELEASE") xen=$(cat "$DEBS/XEN_VERSION") kernel=$KVER dom0 words: $WORDS" >"$LOG"
[ "$ARCH" != x86_64 ] || echo "host_qemu $("${XENVIRTIO_E2E_QEMU_X86:-qemu-system-x86_64}" --version | head -n 1) -accel ${XENVIRTIO_E2E_X86_ACCEL:-tcg} -cpu ${XENVIRTIO_E2E_X86_CPU:-max,-smap,-smep,-xsave}" >>"$LOG"
# run_qemu QEMU-ARGS...: QEMU with its serial on stdout, timestamped into LOG; sets rc.
run_qemu() {
  set +e
  timeout --foreground -k 10 "$TIMEOUT" "$@" </dev/null 2>&1 | stamp >>"$LOG"
  rc=${PIPESTATUS[0]}
  set -e
}

rc=0
case $ARCH in
  x86_64)
    # -cpu max crashes a PV Dom0 under TCG (SMAP emulation): drop smap and smep.
    # -xsave: with XSAVE, user processes in PV domains (Dom0 and PV DomUs) die of random
    # segfaults under TCG once two domains share the CPUs (register state corrupted across
    # context switches: pointers read from %xmm0, bad %fs-relative loads); Xen then falls back to
    # FXSAVE and guests lose AVX, which nothing here needs.
    # -accel tcg (multi-threaded TCG): an x86 PVH DomU that Xen moves between the two CPUs
    # triple-faults in about one boot in twenty, on the instruction after a VM exit; pinned to
    # one (guest/domU-pvh.cfg), none did in 120. e2e.sh boots again when one happens before any
    # check. XENVIRTIO_E2E_X86_ACCEL=tcg,thread=single had no such fault in 40 boots, but
    # its first CI run lost a PVH DomU mid-run to a kernel crash (docs/E2E.md, "Emulator faults").
    XEN_ARGS="console=com1 com1=115200,8n1 dom0_mem=1024M,max:1024M dom0_max_vcpus=2 loglvl=all guest_loglvl=all noreboot ${XENVIRTIO_E2E_XEN_ARGS:-}"
    run_qemu "${XENVIRTIO_E2E_QEMU_X86:-qemu-system-x86_64}" -M pc -accel "${XENVIRTIO_E2E_X86_ACCEL:-tcg}" -cpu "${XENVIRTIO_E2E_X86_CPU:-max,-smap,-smep,-xsave}" \
      -m "$MEM" -smp 2 -display none -serial stdio -monitor none -no-reboot \
      -kernel "$OUT/xen" -append "$XEN_ARGS" \
      -initrd "$KERNEL $DOM0_ARGS,$OUT/dom0.cpio"
    ;;
  arm64)
    # Xen is loaded with -kernel at EL2; the Dom0 kernel and initramfs are placed with
    # -device loader and described to Xen in /chosen/module@ nodes of a DTB that QEMU dumps
    # with the very same machine options.
    XEN_ARGS="console=dtuart dom0_mem=1024M,max:1024M loglvl=all guest_loglvl=all noreboot"
    KADDR=0x50000000 RADDR=0x58000000
    RAMDISK=$OUT/dom0.cpio
    KSIZE=$(printf '0x%x' "$(stat -c %s "$KERNEL")")
    RSIZE=$(printf '0x%x' "$(stat -c %s "$RAMDISK")")
    [ $((RADDR - KADDR)) -gt $((KSIZE)) ] || { echo "boot.sh: kernel overlaps the initramfs" >&2; exit 2; }
    QCOMMON=(-machine "virt,gic-version=3,virtualization=true" -accel tcg -cpu cortex-a57 -m "$MEM" -smp 2
      -display none -monitor none -no-reboot)
    DTB=$OUT/virt.dtb
    qemu-system-aarch64 "${QCOMMON[@]}" -machine dumpdtb="$DTB" >/dev/null 2>&1
    fdtput -t s "$DTB" /chosen xen,xen-bootargs "$XEN_ARGS"
    fdtput -t s "$DTB" /chosen xen,dom0-bootargs "$DOM0_ARGS"
    fdtput -t i "$DTB" /chosen '#address-cells' 2
    fdtput -t i "$DTB" /chosen '#size-cells' 2
    fdtput -c "$DTB" "/chosen/module@${KADDR#0x}"
    fdtput -t s "$DTB" "/chosen/module@${KADDR#0x}" compatible multiboot,kernel multiboot,module
    fdtput -t x "$DTB" "/chosen/module@${KADDR#0x}" reg 0 "$KADDR" 0 "$KSIZE"
    fdtput -c "$DTB" "/chosen/module@${RADDR#0x}"
    fdtput -t s "$DTB" "/chosen/module@${RADDR#0x}" compatible multiboot,ramdisk multiboot,module
    fdtput -t x "$DTB" "/chosen/module@${RADDR#0x}" reg 0 "$RADDR" 0 "$RSIZE"
    run_qemu qemu-system-aarch64 "${QCOMMON[@]}" -serial stdio \
      -dtb "$DTB" -kernel "$DEBS/stage/boot/xen-$XEN-arm64" \
      -device "loader,file=$KERNEL,addr=$KADDR,force-raw=on" \
      -device "loader,file=$RAMDISK,addr=$RADDR,force-raw=on"
    ;;
  *) echo "boot.sh: unknown arch $ARCH" >&2; exit 2 ;;
esac
echo "host_end $(date +%s.%N) rc=$rc" >>"$LOG"
exit "$rc"
