# shellcheck shell=dash
# common.sh: expectations and per-domain checks shared by the test scripts of every mode.
# Sourced after /xv/lib/xv-lib.sh and xv_setup (XV_ARCH, XV_DOM are set).

# xv_expect_guest_type DOMAIN: what /sys/hypervisor/guest_type must say.
xv_expect_guest_type() {
  case "$XV_ARCH/$1" in
    x86_64/dom0 | x86_64/domU-pv) echo PV ;;
    x86_64/domU-pvh) echo PVH ;;
    arm64/*) echo HVM ;; # Xen on Arm guests are all "HVM", even for xl type="pvh"
    *) echo unknown ;;
  esac
}

# xv_expect_hugetlb DOMAIN: yes when 2 MiB huge pages must be usable (not in x86 PV guests).
xv_expect_hugetlb() {
  case "$XV_ARCH/$1" in
    x86_64/dom0 | x86_64/domU-pv) echo no ;;
    *) echo yes ;;
  esac
}

# xv_expect_uname_m DOMAIN: what `uname -m` prints in DOMAIN.
xv_expect_uname_m() {
  case $XV_ARCH in
    arm64) echo aarch64 ;;
    *) echo "$XV_ARCH" ;;
  esac
}

# xv_expect_foreign_map DOMAIN: what Dom0's privcmd mapping of DOMAIN's pinned page by its frame
# number does: "works" (PVH, Arm: frame numbers are guest-physical) or "refused" (x86 PV: they
# are pseudo-physical, not the machine frames privcmd wants).
xv_expect_foreign_map() {
  case "$XV_ARCH/$1" in
    x86_64/domU-pv | x86_64/dom0) echo refused ;;
    *) echo works ;;
  esac
}

# xv_expect_ioreq DOMAIN: what Xen answers when Dom0 asks for an IOREQ server for DOMAIN, the
# thing a trapped virtio-mmio or virtio-pci device model needs: "available" on x86 (Debian's Xen
# 4.17 and 4.20 are built with CONFIG_IOREQ_SERVER), "unavailable" on arm64 (neither is);
# nothing for an x86 PV DomU, which cannot have one.
xv_expect_ioreq() {
  case "$XV_ARCH/$1" in
    x86_64/domU-pv | */dom0) ;;
    x86_64/*) echo available ;;
    *) echo unavailable ;;
  esac
}

# xv_expect_vduse: whether this release's guest kernel has VDUSE: Debian 13's 6.12 builds
# vduse.ko, vdpa.ko and virtio_vdpa.ko; Debian 12's 6.1 does not.
xv_expect_vduse() {
  case $XV_RELEASE in
    bookworm) echo unavailable ;;
    *) echo available ;;
  esac
}

# xv_load_kernel_paths: nbd.ko (4 devices, as the kernel block-device cells use it) and, where
# the release's kernel has them, the VDUSE modules (modprobe resolves their dependencies).
xv_load_kernel_paths() {
  [ -d /sys/module/nbd ] || modprobe nbd nbds_max=4 max_part=0 || return 1
  [ "$(xv_expect_vduse)" = unavailable ] || modprobe -a vduse virtio_vdpa virtio_blk
}

# xv_check_kernel_paths: `xenvirtio-frontend kernel-paths --probe` after loading the modules:
# nbd must be available on every release; VDUSE where the release's kernel has it, with a real
# virtio-blk device created and destroyed in it (check kernel-paths).
xv_check_kernel_paths() {
  local _out _rc _want _nbd _vduse
  xv_load_kernel_paths
  _out=$(xenvirtio-frontend kernel-paths --probe 2>&1)
  _rc=$?
  _want=$(xv_expect_vduse)
  _nbd=$(echo "$_out" | grep '^nbd:')
  _vduse=$(echo "$_out" | grep '^vduse:')
  case "$_rc:$_want:$_nbd:$_vduse" in
    0:available:"nbd:   available"*:"vduse: available"*"device was created and destroyed"* | \
      0:unavailable:"nbd:   available"*:"vduse: not available"*)
      xv_check kernel-paths PASS "$XV_RELEASE, VDUSE expected $_want: $(echo "$_out" | xv_oneline)" ;;
    *) xv_check kernel-paths FAIL "rc=$_rc, VDUSE expected $_want on $XV_RELEASE: $(echo "$_out" | xv_oneline)" ;;
  esac
}

# xv_check_role: `xenvirtio-selftest role` (DomainRole::detect) printed and asserted against
# this domain's expectations: selftest-role-detect, -role-dom0, -role-guest-type, -role-arch,
# -role-xen-version, -role-name (and -role-dom0-evidence where xenfs is mounted).
xv_check_role() {
  local dom0=no
  [ "$XV_DOM" = dom0 ] && dom0=yes
  xv_check_lines selftest- xenvirtio-selftest role --expect-dom0 "$dom0" \
    --expect-type "$(xv_expect_guest_type "$XV_DOM")" --expect-arch "$(xv_expect_uname_m "$XV_DOM")" \
    --expect-xen "$XV_XEN" --expect-name "$(xv_expect_xs_name "$XV_DOM")"
}

# xv_expect_xs_name DOMAIN: the domain's name in xenstore (xen-init-dom0 names Dom0 Domain-0).
xv_expect_xs_name() {
  case $1 in
    dom0) echo Domain-0 ;;
    *) echo "$1" ;;
  esac
}

# xv_check_domain_basics: the checks every domain runs on itself, in every mode.
xv_check_domain_basics() {
  local want missing n st
  want="gntalloc gntdev evtchn xenbus"
  [ "$XV_DOM" = dom0 ] && want="$want privcmd"
  missing=
  for n in $want; do
    [ -c "/dev/xen/$n" ] || missing="$missing $n"
  done
  if [ -z "$missing" ]; then
    xv_check dev-xen PASS "/dev/xen/{$(echo "$want" | tr ' ' ',')} are character devices"
  else
    xv_check dev-xen FAIL "missing:$missing; /dev/xen has: $(cd /dev/xen 2>&1 && echo *)"
  fi

  xv_check_eq gntalloc-limit "$(cat /xv/gntalloc-limit)" \
    "$(cat /sys/module/xen_gntalloc/parameters/limit 2>&1)" "(xen-gntalloc limit= parameter)"

  xv_check_eq guest-type "$(xv_expect_guest_type "$XV_DOM")" "$(cat /sys/hypervisor/guest_type 2>&1)" \
    "(/sys/hypervisor/guest_type)"

  xv_check_project_binaries
  xv_check_role

  # A fact line: where huge pages exist. It fails only when the expectation does not hold.
  st=$(xv_hugetlb_state)
  if [ "${st%% *}" = "$(xv_expect_hugetlb "$XV_DOM")" ]; then
    xv_check hugetlbfs PASS "available=$st (expected ${st%% *})"
  else
    xv_check hugetlbfs FAIL "available=$st, expected $(xv_expect_hugetlb "$XV_DOM")"
  fi
}

# xv_check_delivered DOMU...: for each DomU whose count of emitted check lines was saved in
# $XV_RUN/<name>.emitted (before it was destroyed), check that Dom0's console forwarder
# delivered exactly as many: no check line of a DomU is lost on its way to the serial log.
xv_check_delivered() {
  local _n _emitted _delivered
  for _n in "$@"; do
    [ -f "$XV_RUN/$_n.emitted" ] || continue
    _emitted=$(cat "$XV_RUN/$_n.emitted")
    _delivered=$(xv_forwarded_checks "$_n")
    if [ "$_emitted" = "$_delivered" ]; then
      xv_check_for "$_n" checks-delivered PASS "all $_emitted check lines of $_n reached Dom0's console"
    else
      xv_check_for "$_n" checks-delivered FAIL "$_n emitted '$_emitted' check lines, its console delivered $_delivered"
    fi
  done
}
