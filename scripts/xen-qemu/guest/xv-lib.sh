# shellcheck shell=dash
# xv-lib.sh: the guest half of scripts/e2e.sh, sourced by the inits and by the test scripts in
# Dom0 and in the DomUs (busybox sh). It owns three things:
#   1. check lines:   xv_check NAME PASS|FAIL [DETAIL...]  ->  "@@CHECK <arch> <domain> NAME PASS|FAIL DETAIL"
#   2. Dom0 only:     DomU lifecycle and console forwarding (xv_domu_create, xv_domu_wait_boot, ...)
#   3. Dom0 only:     the command channel into a DomU (xv_domu_run), served in the DomU by
#                     `xenvirtio-selftest agent`
# It never exits the caller and never uses `set -e`: a failing check is reported, and the script
# goes on to the next one. docs/E2E.md is the reference for every interface below.

XV_RUN=${XV_RUN:-/run/xv}             # runtime state of this domain
XV_CHECKS=$XV_RUN/checks              # every @@CHECK line this domain emitted (Dom0: and forwarded)
XV_AGENT_KEY=data/xenvirtio-agent     # below /local/domain/<domid>
XV_CONSOLE_DIR=/var/log/xen/console   # xenconsoled --log=guest --log-dir=...

# xv_setup DOMAIN: set XV_ARCH (x86_64|arm64), XV_DOM, XV_MODE (from the kernel cmdline `xvmode=`).
xv_setup() {
  XV_DOM=$1
  case $(uname -m) in
    aarch64) XV_ARCH=arm64 ;;
    *) XV_ARCH=$(uname -m) ;;
  esac
  XV_MODE=$(xv_cmdline xvmode)
  [ -n "$XV_MODE" ] || XV_MODE=smoke
  # XV_RELEASE, XV_XEN (series), XV_XEN_VERSION, XV_KVER: written by build-initrd.sh
  # shellcheck source=/dev/null
  [ ! -f /xv/release ] || . /xv/release
  mkdir -p "$XV_RUN"
  : >>"$XV_CHECKS"
  export XV_DOM XV_ARCH XV_MODE XV_RUN XV_CHECKS XV_RELEASE XV_XEN XV_XEN_VERSION XV_KVER
}

# xv_cmdline WORD: value of WORD=... on the kernel command line (empty if absent).
xv_cmdline() {
  tr ' ' '\n' </proc/cmdline | sed -n "s/^$1=//p" | tail -n1
}

# xv_uptime: whole seconds since this kernel booted (the clock for every deadline here).
xv_uptime() {
  cut -d. -f1 /proc/uptime
}

# xv_alive PID: PID runs and is not a zombie. A DomU's orphans belong to its PID 1 (the agent),
# which does not wait for them, so `kill -0` alone is true for ever after one exits.
xv_alive() {
  kill -0 "$1" 2>/dev/null && [ "$(cut -d' ' -f3 "/proc/$1/stat" 2>/dev/null)" != Z ]
}

# xv_task_usage PID...: "<CPU ticks> <context switches>" of the processes PID, every thread
# counted: utime + stime of /proc/PID/stat (USER_HZ ticks, 100 a second), and the voluntary and
# involuntary switches of each /proc/PID/task/*/status. A process that is gone counts 0.
xv_task_usage() {
  local _p _t=0 _c=0
  for _p in "$@"; do
    [ -r "/proc/$_p/stat" ] || continue
    # after "PID (comm) ", whose comm may hold spaces, utime and stime are fields 12 and 13
    _t=$((_t + $(sed 's/^.*) //' "/proc/$_p/stat" | awk '{ print $12 + $13 }')))
    _c=$((_c + $(cat "/proc/$_p"/task/*/status 2>/dev/null |
      awk '/^(non)?voluntary_ctxt_switches:/ { s += $2 } END { print s + 0 }')))
  done
  echo "$_t $_c"
}

# xv_oneline [TEXT...]: TEXT (or stdin) squashed to one line of at most 300 characters, with
# "@@" broken up so that quoted output never looks like a check line or a summary.
xv_oneline() {
  if [ $# -gt 0 ]; then printf '%s' "$*"; else cat; fi |
    tr '\r\n\t' '   ' | sed 's/  */ /g; s/^ //; s/ $//; s/@@/@ @/g' | cut -c1-300
}

# xv_check_for DOMAIN NAME PASS|FAIL [DETAIL...]: emit a check line on behalf of DOMAIN. Dom0 uses
# it for a DomU that cannot speak for itself (it never booted). Always returns 0.
xv_check_for() {
  local _detail _dom _line _name _st
  _dom=$1 _name=$2 _st=$3
  shift 3
  case $_name in
    '' | *' '*) set -- "bad check name '$_name':" "$@"; _name=bad-check-name _st=FAIL ;;
  esac
  case $_st in
    PASS | FAIL) ;;
    *) set -- "bad status '$_st':" "$@"; _st=FAIL ;;
  esac
  _detail=$(xv_oneline "$@")
  _line="@@CHECK $XV_ARCH $_dom $_name $_st${_detail:+ $_detail}"
  echo "$_line" >>"$XV_CHECKS"
  echo "$_line"
  return 0
}

# xv_check NAME PASS|FAIL [DETAIL...]: emit one check line for this domain.
xv_check() {
  xv_check_for "$XV_DOM" "$@"
}

# xv_check_eq NAME EXPECTED ACTUAL [CONTEXT...]: PASS when ACTUAL = EXPECTED (an empty EXPECTED fails).
xv_check_eq() {
  local _a _e _n
  _n=$1 _e=$2 _a=$3
  shift 3
  if [ -z "$_e" ]; then
    xv_check "$_n" FAIL "no expected value (got '$_a')" "$@"
  elif [ "$_a" = "$_e" ]; then
    xv_check "$_n" PASS "$_a" "$@"
  else
    xv_check "$_n" FAIL "got '$_a' expected '$_e'" "$@"
  fi
}

# xv_check_cmd NAME COMMAND...: PASS when COMMAND exits 0; the detail is the tail of its output.
xv_check_cmd() {
  local _n _out _rc
  _n=$1
  shift
  _out=$("$@" 2>&1)
  _rc=$?
  if [ $_rc = 0 ]; then
    xv_check "$_n" PASS "$(printf '%s' "$_out" | tail -n1 | xv_oneline)"
  else
    xv_check "$_n" FAIL "rc=$_rc: $(printf '%s' "$_out" | tail -n3 | xv_oneline)"
  fi
}

# xv_check_lines PREFIX COMMAND...: run COMMAND (a project program, e.g. xenvirtio-selftest)
# that reports its own results as lines "PASS <name> [detail]" / "FAIL <name> [detail]" on
# stdout, and turn each into the check PREFIX<name>. Other output is passed through. COMMAND
# must report something: no result line, or a non-zero exit without a FAIL line, is a FAIL
# "PREFIXexit". Returns COMMAND's exit status.
xv_check_lines() {
  local _p _out _rc _nf _nr _l _st _rest
  _p=$1
  shift
  _out=$XV_RUN/check-lines.$$
  "$@" >"$_out" 2>&1
  _rc=$?
  _nf=0 _nr=0
  while IFS= read -r _l; do
    case $_l in
      'PASS '* | 'FAIL '*)
        _st=${_l%% *} _rest=${_l#* }
        xv_check "$_p${_rest%% *}" "$_st" "$(case $_rest in *' '*) echo "${_rest#* }" ;; esac)"
        _nr=$((_nr + 1))
        [ "$_st" = PASS ] || _nf=$((_nf + 1))
        ;;
      *) echo "$_l" ;;
    esac
  done <"$_out"
  if [ "$_nr" = 0 ]; then
    xv_check "${_p}exit" FAIL "$1 exited $_rc and reported no result: $(tail -n 3 "$_out" | xv_oneline)"
  elif [ "$_rc" != 0 ] && [ "$_nf" = 0 ]; then
    xv_check "${_p}exit" FAIL "$1 exited $_rc without reporting a failure: $(tail -n 3 "$_out" | xv_oneline)"
  fi
  rm -f "$_out"
  return "$_rc"
}

# xv_elf_machine FILE: the ELF e_machine of FILE as arch name (x86_64, arm64 or hex).
xv_elf_machine() {
  local _m
  _m=$(od -An -tx1 -j18 -N2 "$1" 2>/dev/null | tr -d ' \n')
  case $_m in
    3e00) echo x86_64 ;;
    b700) echo arm64 ;;
    *) echo "e_machine=${_m:-unreadable}" ;;
  esac
}

# xv_check_project_binaries: every /usr/bin/xenvirtio-* is an ELF of this arch and executes.
# "Executes" means: exit code below 126 and output that names the binary. (busybox sh would run a
# foreign ELF as a shell script, so the arch is checked from the ELF header first.)
xv_check_project_binaries() {
  local _b _bn _found _m _out _rc
  _found=0
  for _b in /usr/bin/xenvirtio-*; do
    [ -f "$_b" ] || continue
    _found=$((_found + 1))
    _bn=${_b##*/}
    _m=$(xv_elf_machine "$_b")
    if [ "$_m" != "$XV_ARCH" ]; then
      xv_check "run-$_bn" FAIL "ELF is $_m, domain is $XV_ARCH"
      continue
    fi
    _out=$("$_b" --help 2>&1 </dev/null)
    _rc=$?
    case "$_rc:$_out" in
      12[6-9]:* | 1[3-9][0-9]:* | 2[0-9][0-9]:*) xv_check "run-$_bn" FAIL "rc=$_rc: $(echo "$_out" | head -n2 | xv_oneline)" ;;
      *"$_bn"*) xv_check "run-$_bn" PASS "rc=$_rc: $(echo "$_out" | head -n1 | xv_oneline)" ;;
      *) xv_check "run-$_bn" FAIL "rc=$_rc, output does not name the binary: $(echo "$_out" | head -n2 | xv_oneline)" ;;
    esac
  done
  [ "$_found" -gt 0 ] || xv_check project-binaries FAIL "no /usr/bin/xenvirtio-* in this domain"
  # The binaries came from the project's .deb (build-initrd.sh unpacks it): its other files too.
  if [ -s /xv/package ] && [ -f /lib/systemd/system/xenvirtio-backend.service ] &&
    [ -f /lib/systemd/system/xenvirtio-frontend.service ] && [ -f /usr/share/doc/xenvirtio/copyright ]; then
    xv_check package PASS "installed from the package $(cat /xv/package): $_found binaries, both systemd units, the docs"
  else
    xv_check package FAIL "not installed from the project's package: /xv/package='$(cat /xv/package 2>/dev/null)', units or docs missing"
  fi
}

# xv_hugetlb_setup PAGES: reserve PAGES default-size huge pages and mount hugetlbfs on
# /dev/hugepages. Quiet; returns 0 when huge pages are usable (not on x86 PV).
xv_hugetlb_setup() {
  echo "$1" >/proc/sys/vm/nr_hugepages 2>/dev/null
  [ "$(cat /proc/sys/vm/nr_hugepages 2>/dev/null || echo 0)" -gt 0 ] || return 1
  mkdir -p /dev/hugepages
  grep -q ' /dev/hugepages hugetlbfs ' /proc/mounts ||
    mount -t hugetlbfs hugetlbfs /dev/hugepages 2>/dev/null
}

# xv_hugetlb_state: "yes nr=<n> size=<kB>kB" when hugetlbfs is mounted with pages reserved, else "no ...".
xv_hugetlb_state() {
  local _nr _sz
  _nr=$(cat /proc/sys/vm/nr_hugepages 2>/dev/null || echo 0)
  _sz=$(sed -n 's/^Hugepagesize: *\([0-9]*\) kB/\1/p' /proc/meminfo)
  if [ "$_nr" -gt 0 ] && grep -q ' /dev/hugepages hugetlbfs ' /proc/mounts; then
    echo "yes nr=$_nr size=${_sz}kB"
  else
    echo "no nr=$_nr"
  fi
}

# ---------------------------------------------------------------------------------------------
# Dom0 only: DomUs, their consoles, and the command channel.
# ---------------------------------------------------------------------------------------------

# xv_domid NAME|DOMID: print the domid (a number is passed through).
xv_domid() {
  case $1 in
    '' | *[!0-9]*) xl domid "$1" 2>/dev/null ;;
    *) echo "$1" ;;
  esac
}

# xv_domu_create NAME: `xl create /etc/xen/NAME.cfg` with the mode of this run, and start
# forwarding its console to ours. The config's @XVMODE@ is replaced by this run's mode. On
# success the domid goes to $XV_RUN/NAME.domid and "@@MARK dom0 created NAME domid=<N>" to the
# console: the host maps Xen's "d<N>v0 Triple fault" lines to a domain with it (boot-fault.sh).
# On failure, xl's output goes to the console and one line about it to stdout.
xv_domu_create() {
  local _cfg _out _rc
  _cfg=$XV_RUN/$1.cfg
  sed "s/@XVMODE@/$XV_MODE/g" "/etc/xen/$1.cfg" >"$_cfg" || return 1
  xv_induce_fault_cfg "$1" before-checks "$_cfg"
  echo "$1" >>"$XV_RUN/fwd.names"
  _out=$(xv_create_paused "$1" "$_cfg" 2>&1)
  _rc=$?
  if [ $_rc != 0 ]; then
    # the whole story goes to the serial log; the caller's detail gets the first errors
    echo "$_out" | sed "s/^/[xl create $1] /" >/dev/console 2>/dev/null
    echo "xl create $1 failed (rc=$_rc): $(echo "$_out" | grep -i -m 3 'error\|fail' | xv_oneline)"
  fi
  return $_rc
}

# xv_create_held NAME CFG: xl create CFG paused and record the domid (before the domain runs at
# all: it may die within a second) in $XV_RUN/NAME.domid and in the serial log's MARK line,
# which the emulator-fault rule reads. The domain stays paused.
xv_create_held() {
  xl create -p "$2" || return $?
  xv_domid "$1" >"$XV_RUN/$1.domid"
  echo "@@MARK dom0 created $1 domid=$(cat "$XV_RUN/$1.domid")" >/dev/console 2>/dev/null
}

# xv_create_paused NAME CFG: xv_create_held, then unpause it.
xv_create_paused() {
  xv_create_held "$1" "$2" || return $?
  xl unpause "$1"
}

# Emulator faults (docs/E2E.md, "Emulator faults"). Under QEMU TCG an x86 PVH DomU's kernel
# sometimes triple-faults while it boots. A domain that dies that way before it reported its own
# "boot" has run nothing of the project's (domU-init reports boot before it starts any project
# program), so the host boots the arch again (e2e.sh, at most 3 attempts; kernel cmdline
# xvattempt=<n>/<max>). A fault after that is a failure like any other.

# xv_triple_fault DOMID: Xen's triple-fault line for DOMID, if it logged one.
xv_triple_fault() {
  xl dmesg 2>/dev/null | grep -a -E "(^|[ )])d$1v[0-9]+ Triple fault" | tail -n 1 | xv_oneline
}

# xv_last_attempt: true on the host's last boot attempt of this arch (or when it did not say).
xv_last_attempt() {
  local _a
  _a=$(xv_cmdline xvattempt)
  [ -z "$_a" ] || [ "${_a%/*}" = "${_a#*/}" ]
}

# xv_abort_for_retry NAME WHY: when the host will boot again, say why and power off now (the
# checks of this attempt do not count); on the last attempt, return and let the checks go on.
xv_abort_for_retry() {
  xv_last_attempt && return 0
  echo "@@MARK dom0 emulator fault: $1 $2 before it reported boot; powering off, the host boots again (attempt $(xv_cmdline xvattempt))"
  xv_forward_stop
  sync
  poweroff -f
}

# xv_induce_fault_cfg NAME WHEN CFG: for the harness's own test of the above (e2e.sh
# --induce-fault WHEN, x86_64 only): NAME=domU-pvh boots fault/triple-fault.S instead of Linux.
xv_induce_fault_cfg() {
  [ "$1" = domU-pvh ] && [ "$(xv_cmdline xvinduce)" = "$2" ] || return 0
  sed -i 's|^kernel = .*|kernel = "/boot/triple-fault"|; /^ramdisk = /d' "$3"
  echo "@@MARK dom0 induced fault: $1 boots /boot/triple-fault ($2)" >/dev/console 2>/dev/null
}

# xv_induce_fault_after_checks NAME...: with `xvinduce=after-checks`, once domU-pvh (one of
# NAME...) has run its checks and was destroyed, boot the triple-fault kernel under its name
# and wait until Xen has shut it down: a fault in a domain after its project checks ran.
xv_induce_fault_after_checks() {
  local _cfg _i _n
  case " $* " in *" domU-pvh "*) ;; *) return 0 ;; esac
  [ "$(xv_cmdline xvinduce)" = after-checks ] || return 0
  _n=domU-pvh
  _cfg=$XV_RUN/$_n.cfg
  sed "s/@XVMODE@/$XV_MODE/g" "/etc/xen/$_n.cfg" >"$_cfg"
  xv_induce_fault_cfg "$_n" after-checks "$_cfg"
  xv_create_paused "$_n" "$_cfg" >/dev/null 2>&1 || return 0
  _i=0
  while [ "$(xv_domu_state "$_n")" != gone ] && [ $_i -lt 60 ]; do
    sleep 1
    _i=$((_i + 1))
  done
}

# xv_domu_state NAME: the state column of `xl list NAME` (e.g. "-b----"), or "gone".
xv_domu_state() {
  xl list "$1" 2>/dev/null | awk 'NR == 2 { print $5 }' | grep . || echo gone
}

# xv_domu_wait_boot NAME TIMEOUT [CHECK]: wait until NAME's console shows its own "boot" check
# line (CHECK: another name, e.g. boot-reboot for a domain booted again with xvboot=reboot).
# On timeout, or when the domain crashed or vanished, emit "NAME CHECK FAIL" on its behalf.
# Returns 0 only if the DomU reported CHECK PASS.
xv_domu_wait_boot() {
  local _end _l _log _n _prev _s _tf _c
  _n=$1 _end=$(($(xv_uptime) + $2)) _prev='' _c=${3:-boot}
  _log=$XV_CONSOLE_DIR/guest-$1.log
  while :; do
    _l=$(grep -a "@@CHECK $XV_ARCH $_n $_c " "$_log" 2>/dev/null | head -n1)
    if [ -n "$_l" ]; then
      case $_l in *" $_c PASS"*) return 0 ;; *) return 1 ;; esac
    fi
    _s=$(xv_domu_state "$_n")
    case $_s in
      *c* | *s*) break ;;
      gone) [ "$_prev" = gone ] && break ;; # twice in a row: not a hiccup of xl
    esac
    _prev=$_s
    [ "$(xv_uptime)" -lt "$_end" ] || break
    sleep 1
  done
  _tf=$(xv_triple_fault "$(cat "$XV_RUN/$_n.domid" 2>/dev/null)")
  [ -z "$_tf" ] || xv_abort_for_retry "$_n" "triple-faulted ($_tf)"
  _l=$(grep -a -m 1 -E 'Kernel panic|Oops|BUG:|Segmentation fault' "$_log" 2>/dev/null)
  _l=${_tf:-$_l}
  xv_check_for "$_n" "$_c" FAIL "no boot report after waiting $(($(xv_uptime) - _end + $2))s; xl state=$_s;" \
    "${_l:+first sign of trouble: $_l;} console tail: $(tail -n 3 "$_log" 2>/dev/null | xv_oneline)"
  return 1
}

# xv_domu_destroy NAME: xl destroy (its console keeps being forwarded until xv_forward_stop).
xv_domu_destroy() {
  xl destroy "$1" >/dev/null 2>&1
}

# Console forwarding. Each DomU console log in $XV_CONSOLE_DIR is copied to Dom0's console, one
# line at a time, prefixed "[NAME] ", exactly once: a per-domain counter of forwarded complete lines
# lives in $XV_RUN/fwd-NAME.lines. Only the forwarder loop forwards; xv_forward_stop ends it and
# then forwards the remainder, so no line is lost or repeated. Forwarded @@CHECK lines are also
# recorded in $XV_CHECKS, which makes Dom0's @@SUMMARY count cover the DomUs too, and in
# $XV_RUN/fwd-NAME.checks (xv_forwarded_checks).
xv_forward_once() {
  local _done _fl _fline _fs _total
  _fl=$XV_CONSOLE_DIR/guest-$1.log _fs=$XV_RUN/fwd-$1.lines
  [ -f "$_fl" ] || return 0
  _done=0
  [ -f "$_fs" ] && _done=$(cat "$_fs")
  _total=$(wc -l <"$_fl")
  # a failed read must never restart the log from the top: skip this round instead
  case "$_done:$_total" in *[!0-9:]* | :* | *:) return 0 ;; esac
  [ "$_total" -gt "$_done" ] || return 0
  tail -n +"$((_done + 1))" "$_fl" | head -n "$((_total - _done))" | tr -d '\r' |
    while IFS= read -r _fline; do
      echo "[$1] $_fline"
      case $_fline in
        *"@@CHECK "*)
          echo "@@CHECK ${_fline#*@@CHECK }" >>"$XV_CHECKS"
          echo "@@CHECK ${_fline#*@@CHECK }" >>"$XV_RUN/fwd-$1.checks"
          ;;
      esac
    done
  echo "$_total" >"$_fs"
}

xv_forward_all() {
  local _fn
  sort -u "$XV_RUN/fwd.names" 2>/dev/null | while read -r _fn; do xv_forward_once "$_fn"; done
}

# xv_forward_start: start the forwarder loop in the background (once per run).
xv_forward_start() {
  rm -f "$XV_RUN/fwd.stop"
  : >>"$XV_RUN/fwd.names"
  (while [ ! -e "$XV_RUN/fwd.stop" ]; do xv_forward_all; sleep 1; done) &
  XV_FWD_PID=$!
}

# xv_forward_stop: stop the loop, wait for it, forward what is left.
xv_forward_stop() {
  [ -n "${XV_FWD_PID:-}" ] || return 0
  touch "$XV_RUN/fwd.stop"
  wait "$XV_FWD_PID" 2>/dev/null
  XV_FWD_PID=
  xv_forward_all
}

# xv_forwarded_checks NAME: how many @@CHECK lines NAME's console has delivered so far.
xv_forwarded_checks() {
  grep -c '^@@CHECK ' "$XV_RUN/fwd-$1.checks" 2>/dev/null || echo 0
}

# xv_agent_wait NAME|DOMID TIMEOUT: wait until the DomU's agent has published ready=1.
xv_agent_wait() {
  local _d _end
  _d=$(xv_domid "$1") || return 1
  [ -n "$_d" ] || return 1
  _end=$(($(xv_uptime) + $2))
  while [ "$(xenstore-read "/local/domain/$_d/$XV_AGENT_KEY/ready" 2>/dev/null)" != 1 ]; do
    [ "$(xv_uptime)" -lt "$_end" ] || return 1
    sleep 0.5
  done
}

# xv_domu_run NAME|DOMID TIMEOUT COMMAND: run COMMAND with `sh` inside the DomU through its
# agent (`xenvirtio-selftest agent`). Prints COMMAND's stdout and stderr (merged, at most their last 24 KiB)
# and returns its exit status. The agent kills COMMAND after TIMEOUT seconds (status 143, or
# 137 if it ignored SIGTERM). Channel errors: 124 with a message = no answer within
# TIMEOUT+30 s, 125 = no such domain, no agent ready in it, the request could not be written, or
# the domain went away before it answered.
# Requests to one DomU run one at a time, in order; start daemons with `... >LOG 2>&1 &`.
xv_domu_run() {
  local _d _tmo _base _seq _ans _rc _chunks _keys _i _end
  _d=$(xv_domid "$1")
  _tmo=$2
  if [ -z "$_d" ]; then
    echo "xv_domu_run: no domain '$1'"
    return 125
  fi
  _base=/local/domain/$_d/$XV_AGENT_KEY
  if [ "$(xenstore-read "$_base/ready" 2>/dev/null)" != 1 ]; then
    echo "xv_domu_run: no agent serves domain $_d ($_base/ready is not 1)"
    return 125
  fi
  _seq=$(($(cat "$XV_RUN/seq" 2>/dev/null || echo 0) + 1))
  echo "$_seq" >"$XV_RUN/seq"
  if ! xenstore-write "$_base/req/$_seq/timeout" "$_tmo" \
    "$_base/req/$_seq/cmd" "$(printf '%s' "$3" | base64 -w0)"; then
    echo "xv_domu_run: cannot write request $_seq to $_base"
    return 125
  fi
  _end=$(($(xv_uptime) + _tmo + 30))
  _i=0
  # rc is written last: once rc and chunks read, the whole answer is there. Between tries,
  # block on a watch of rc (bounded, in case rc appeared before the watch was set).
  while ! _ans=$(xenstore-read "$_base/rsp/$_seq/rc" "$_base/rsp/$_seq/chunks" 2>/dev/null); do
    if [ "$(xv_uptime)" -ge "$_end" ]; then
      echo "xv_domu_run: no answer from domain $_d to request $_seq within $((_tmo + 30))s"
      return 124
    fi
    # After the first wait (an answer usually comes within it): is the domain still there?
    if [ "$_i" = 1 ] && ! xenstore-read "/local/domain/$_d/name" >/dev/null 2>&1; then
      echo "xv_domu_run: domain $_d is gone (it crashed, rebooted or was destroyed) while request $_seq ran"
      return 125
    fi
    timeout 2 xenstore-watch -n 2 "$_base/rsp/$_seq/rc" >/dev/null 2>&1
    _i=1
  done
  _rc=${_ans%%[!0-9]*}
  _chunks=${_ans##*[!0-9]}
  _keys=
  _i=0
  while [ "$_i" -lt "$_chunks" ]; do
    _keys="$_keys $_base/rsp/$_seq/out/$_i"
    _i=$((_i + 1))
  done
  # shellcheck disable=SC2086 # the keys are words without blanks
  [ -z "$_keys" ] || xenstore-read $_keys | tr -d '\n' | base64 -d
  xenstore-rm "$_base/req/$_seq" "$_base/rsp/$_seq" 2>/dev/null
  return "$_rc"
}
