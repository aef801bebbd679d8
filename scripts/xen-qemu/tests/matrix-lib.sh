# shellcheck shell=dash
# matrix-lib.sh: the cells of the full matrix (issue 6), sourced by matrix-dom0.sh after
# xv-lib.sh and common.sh. Two kinds of functions:
#   mx_probe_*   run in the domain under test (Dom0 itself, or a DomU through the command
#                channel: the DomU image carries this file too) and print one result line;
#   mx_*_cell    run in Dom0: drive a probe in a domain, check the result from Dom0's side
#                (the backend's image file, the console's pty, the backend's stats) and emit
#                the check lines.
# Every cell emits its own check line, PASS or FAIL with the reason; nothing is skipped.

MX_RUN=${XV_RUN:-/run/xv}
MX_IMAGES=/srv/xv                       # the backend's image files (Dom0)
MX_IMAGE_MB=48                          # per domain: 12 cells
MX_CELL_BYTES=$((4 * 1024 * 1024))      # each blk cell owns 4 MiB of its domain's image
MX_LEN=$((2 * 1024 * 1024))             # and writes 2 MiB of it: twice the 1 MiB DMA memory
MX_BACKEND_LOG=$MX_RUN/backend.log
MX_FE=xenvirtio-frontend
MX_BE=xenvirtio-backend

# The policy table (docs/DESIGN.md "Role policy", shared by the matrix and the bench): what each role picks without --dma, and every
# strategy it may be forced to.
mx_default_dma() {
  case "$XV_ARCH/$1" in
    */dom0) echo bounce ;;
    x86_64/domU-pv | x86_64/domU-pvh) echo grant ;;
    arm64/domU-arm) echo direct ;; # Dom0 serves it with --allow-direct
  esac
}
mx_strategies() {
  case "$XV_ARCH/$1" in
    */dom0) echo bounce grant ;;
    x86_64/domU-pv) echo grant bounce ;;
    *) echo grant bounce direct ;;
  esac
}
# ---------------------------------------------------------------------------------------------
# Probes: run in the domain under test.
# ---------------------------------------------------------------------------------------------

# mx_probe_rng DEVID [FRONTEND ARGS...]: read 4096 bytes from rng device DEVID; print
# "rc=<status> bytes=<n> distinct=<byte values seen> <the frontend's connect line>".
mx_probe_rng() {
  local _d _rc _n _k
  _d=$1
  shift
  $MX_FE rng --devid "$_d" "$@" --bytes 4096 >"$MX_RUN/rng.bin" 2>"$MX_RUN/rng.err"
  _rc=$?
  _n=$(wc -c <"$MX_RUN/rng.bin")
  _k=$(od -An -tu1 -v "$MX_RUN/rng.bin" | tr -s ' ' '\n' | grep . | sort -u | wc -l)
  echo "rc=$_rc bytes=$_n distinct=$_k $(tail -n 2 "$MX_RUN/rng.err" | xv_oneline)"
}

# mx_probe_console_start DEVID LINE [FRONTEND ARGS...]: in the background, send LINE to console
# DEVID's port 0 and take one line back (at most 60 s); mx_probe_console_wait collects it.
mx_probe_console_start() {
  local _d _line
  _d=$1 _line=$2
  shift 2
  rm -f "$MX_RUN/console.out"
  (
    echo "$_line" | $MX_FE console --devid "$_d" "$@" --lines 1 --wait 60 >"$MX_RUN/console.out" 2>&1
    echo "rc=$?" >>"$MX_RUN/console.out"
  ) </dev/null >/dev/null 2>&1 &
}

# mx_probe_console_wait: wait (at most 70 s) for the relay of mx_probe_console_start; print its
# output (what came from the host side, the connect line, then "rc=<status>").
mx_probe_console_wait() {
  local _end
  _end=$(($(xv_uptime) + 70))
  while ! grep -q '^rc=' "$MX_RUN/console.out" 2>/dev/null; do
    [ "$(xv_uptime)" -lt "$_end" ] || break
    sleep 0.3
  done
  cat "$MX_RUN/console.out" 2>&1
}

# mx_probe_serve DEVID SOCKET [FRONTEND ARGS...]: start `xenvirtio-frontend serve` for blk DEVID
# with its NBD export on SOCKET (log: $MX_RUN/serve.log); wait (30 s) for the socket.
mx_probe_serve() {
  local _d _s _end
  _d=$1 _s=$2
  shift 2
  rm -f "$_s"
  RUST_LOG=xenvirtio_frontend=info $MX_FE serve --devid "$_d" --nbd-socket "$_s" "$@" \
    </dev/null >"$MX_RUN/serve.log" 2>&1 &
  echo $! >"$MX_RUN/serve.pid"
  # Connecting takes a few seconds under TCG, and much longer on a loaded machine.
  _end=$(($(xv_uptime) + 120))
  while [ ! -S "$_s" ]; do
    if [ "$(xv_uptime)" -ge "$_end" ] || ! xv_alive "$(cat "$MX_RUN/serve.pid")"; then
      echo "serve did not export $_s within 120s: $(tail -n 8 "$MX_RUN/serve.log" | cut -c1-300 | xv_oneline)"
      return 1
    fi
    sleep 0.3
  done
  echo "serving: $(grep -m 2 -E '^device' "$MX_RUN/serve.log" | xv_oneline)"
}

# ---------------------------------------------------------------------------------------------
# Dom0 helpers.
# ---------------------------------------------------------------------------------------------

# mx_stop_serve DOMAIN: stop DOMAIN's running `serve` (mx_probe_serve's), if any, and wait
# until it has exited.
mx_stop_serve() {
  # shellcheck disable=SC2016 # expanded in the DomU
  mx_in "$1" 40 'p=$(cat /run/xv/serve.pid 2>/dev/null) && kill $p 2>/dev/null; while xv_alive $p; do sleep 0.3; done' >/dev/null
}

# mx_count_emitted DOMAIN: how many check lines DOMAIN itself has emitted in this boot (or the
# channel's error).
mx_count_emitted() {
  xv_domu_run "$1" 30 "grep -c '^@@CHECK ' $XV_CHECKS" 2>&1
}

# mx_save_emitted DOMAIN: how many check lines DOMAIN emitted, into $XV_RUN/DOMAIN.emitted for
# xv_check_delivered, with those of its earlier boot (kn_reboot_cell) added.
mx_save_emitted() {
  local _n _b
  _n=$(mx_count_emitted "$1")
  _b=$(cat "$XV_RUN/$1.emitted-before" 2>/dev/null)
  case "$_n:$_b" in
    *[!0-9:]* | :*) ;;
    *:) ;;
    *) _n=$((_n + _b)) ;;
  esac
  echo "$_n" >"$XV_RUN/$1.emitted"
}

# mx_in DOMAIN TIMEOUT COMMAND: run COMMAND with sh in DOMAIN (Dom0 itself, or a DomU through
# the command channel), with this library and knbd-lib.sh loaded. Prints its output; returns its status.
mx_in() {
  if [ "$1" = dom0 ]; then
    timeout -k 5 "$2" sh -c ". /xv/lib/xv-lib.sh; . /xv/tests/matrix-lib.sh; . /xv/tests/knbd-lib.sh; . /xv/tests/net-lib.sh; XV_RUN=$MX_RUN; $3" </dev/null 2>&1
  else
    xv_domu_run "$1" "$2" ". /xv/lib/xv-lib.sh; . /xv/tests/matrix-lib.sh; . /xv/tests/knbd-lib.sh; . /xv/tests/net-lib.sh; $3"
  fi
}

# mx_domid DOMAIN: the domid (dom0 is 0).
mx_domid() {
  case $1 in dom0) echo 0 ;; *) xv_domid "$1" ;; esac
}

# mx_check DOMAIN NAME PASS|FAIL DETAIL...: a check line for DOMAIN, made by Dom0.
mx_check() {
  if [ "$1" = dom0 ]; then
    shift
    xv_check "$@"
  else
    xv_check_for "$@"
  fi
}

# mx_bdir DOMAIN DEVID: the backend directory of the device.
mx_bdir() {
  echo "/local/domain/0/backend/virtio/$(mx_domid "$1")/$2"
}

# mx_fdir DOMAIN DEVID: the frontend directory of the device.
mx_fdir() {
  echo "/local/domain/$(mx_domid "$1")/device/virtio/$2"
}

# mx_dma_args STRATEGY: the frontend's --dma option for STRATEGY (none for auto).
mx_dma_args() {
  case $1 in auto) ;; *) echo "--dma $1" ;; esac
}

# mx_line PATTERN TEXT...: the first line of TEXT matching the grep -E PATTERN.
mx_line() {
  local _p
  _p=$1
  shift
  printf '%s\n' "$*" | grep -m 1 -E "$_p"
}

# mx_backend_start: start the backend daemon with the options in MX_ALLOW_DIRECT (log appended
# to $MX_BACKEND_LOG), and wait (20 s) for its control socket to answer. Sets MX_BACKEND_PID.
mx_backend_start() {
  local _end
  echo "==== xenvirtio-backend serve $MX_ALLOW_DIRECT (uptime $(xv_uptime)s)" >>"$MX_BACKEND_LOG"
  # shellcheck disable=SC2086 # MX_ALLOW_DIRECT is a list of options
  RUST_LOG=${MX_BACKEND_RUST_LOG:-info} $MX_BE serve $MX_ALLOW_DIRECT </dev/null >>"$MX_BACKEND_LOG" 2>&1 &
  MX_BACKEND_PID=$!
  _end=$(($(xv_uptime) + 20))
  until $MX_BE stats >/dev/null 2>&1; do
    if [ "$(xv_uptime)" -ge "$_end" ] || ! kill -0 "$MX_BACKEND_PID" 2>/dev/null; then
      return 1
    fi
    sleep 0.3
  done
}

# mx_backend_start_cell: start the daemon trusting every DomU but the PV one with `direct`
# (check backend-start).
mx_backend_start_cell() {
  local _t
  MX_ALLOW_DIRECT=
  for _t in $XV_DOMUS; do
    [ "$_t" = pv ] || MX_ALLOW_DIRECT="$MX_ALLOW_DIRECT --allow-direct domU-$_t"
  done
  if mx_backend_start; then
    xv_check backend-start PASS "xenvirtio-backend serve$MX_ALLOW_DIRECT (pid $MX_BACKEND_PID); log $MX_BACKEND_LOG"
  else
    xv_check backend-start FAIL "the daemon did not answer on its control socket: $(tail -n 5 "$MX_BACKEND_LOG" | xv_oneline)"
  fi
}

# mx_domus_up: create every DomU of $XV_DOMUS, wait for each to boot and its agent to answer
# (checks boot, channel-ready). Sets `created` (the domains xl created) and `ready` (those whose
# agent answers); waits at most $BOOT_TIMEOUT and $AGENT_TIMEOUT per domain.
mx_domus_up() {
  local _t _n _out
  xv_forward_start
  created=
  for _t in $XV_DOMUS; do
    _n=domU-$_t
    if _out=$(xv_domu_create "$_n"); then
      created="$created $_n"
    else
      xv_check_for "$_n" boot FAIL "$_out"
    fi
  done
  ready=
  for _n in $created; do
    xv_domu_wait_boot "$_n" "$BOOT_TIMEOUT" || continue
    if xv_agent_wait "$_n" "$AGENT_TIMEOUT"; then
      xv_check_for "$_n" channel-ready PASS "agent ready in domid $(xv_domid "$_n")"
      ready="$ready $_n"
    else
      xv_check_for "$_n" channel-ready FAIL "agent did not publish ready=1 within ${AGENT_TIMEOUT}s"
    fi
  done
}

# mx_backend_stop: SIGTERM (and SIGCONT) the daemon and wait (20 s) for it to exit. Sets MX_BACKEND_STOPPED to
# "exit status N" (or "still running"). Not in a subshell: only this shell can reap its child.
mx_backend_stop() {
  local _end
  MX_BACKEND_STOPPED="still running"
  kill -TERM "$MX_BACKEND_PID" 2>/dev/null
  kill -CONT "$MX_BACKEND_PID" 2>/dev/null # a frozen daemon (mx_restart_cell) gets it now
  _end=$(($(xv_uptime) + 20))
  # A child that exited stays a zombie (kill -0 succeeds) until it is waited for.
  while kill -0 "$MX_BACKEND_PID" 2>/dev/null &&
    [ "$(cut -d' ' -f3 "/proc/$MX_BACKEND_PID/stat" 2>/dev/null)" != Z ]; do
    [ "$(xv_uptime)" -lt "$_end" ] || return 1
    sleep 0.2
  done
  wait "$MX_BACKEND_PID" 2>/dev/null
  # shellcheck disable=SC2034 # read by the caller
  MX_BACKEND_STOPPED="exit status $?"
}

# mx_stats_json: the daemon's statistics as one JSON line (empty on failure).
mx_stats_json() {
  $MX_BE stats --json 2>/dev/null | tr -d '\n'
}

# mx_json_num KEY JSON: the first number after "KEY": in JSON.
mx_json_num() {
  printf '%s' "$2" | grep -o "\"$1\":[0-9]*" | head -n 1 | cut -d: -f2
}

# mx_process_counts: "<xen mappings> <event ports> <gntdev/privcmd lines in /proc/PID/maps>"
# of the backend daemon.
mx_process_counts() {
  local _j _maps
  _j=$(mx_stats_json)
  _j=${_j##*\"process\":}
  _maps=$(grep -c -E '/dev/xen/(gntdev|privcmd)$|/proc/xen/privcmd$' "/proc/$MX_BACKEND_PID/maps" 2>/dev/null)
  echo "$(mx_json_num xen_mappings "$_j") $(mx_json_num event_ports "$_j") ${_maps:-?}"
}

# mx_device_json DOMID DEVID: the daemon's stats record of that device, a JSON object (empty
# if there is none).
mx_device_json() {
  local _r
  _r=$(mx_stats_json | tr '{' '\n' | grep "^\"domid\":$1,\"devid\":$2," | sed 's/}[],]*.*$//')
  [ -z "$_r" ] || echo "{$_r}"
}

# mx_wait_backend_state DOMAIN DEVID STATE TIMEOUT: wait until the backend state key is STATE.
mx_wait_backend_state() {
  local _end _p
  _p=$(mx_bdir "$1" "$2")/state
  _end=$(($(xv_uptime) + $4))
  while [ "$(xenstore-read "$_p" 2>/dev/null)" != "$3" ]; do
    [ "$(xv_uptime)" -lt "$_end" ] || return 1
    sleep 0.3
  done
}

# mx_image DOMAIN: the backend's image file of DOMAIN's blk device.
mx_image() {
  echo "$MX_IMAGES/$1.img"
}

# ---------------------------------------------------------------------------------------------
# Cells: run in Dom0.
# ---------------------------------------------------------------------------------------------

# mx_attach_all DOMAIN: attach blk (devid 0, a fresh image), console (1) and rng (2) to DOMAIN.
mx_attach_all() {
  local _d _img _out _rc _devs _bad
  _d=$1
  _img=$(mx_image "$_d")
  rm -f "$_img"
  truncate -s "${MX_IMAGE_MB}M" "$_img"
  _devs='' _bad=''
  for _spec in "blk 0 --image $_img" "console 1" "rng 2"; do
    # shellcheck disable=SC2086 # the spec is words
    set -- $_spec
    _out=$($MX_BE attach --quiet --domain "$(mx_domid "$_d")" --type "$1" --devid "$2" ${3:+"$3"} ${4:+"$4"} 2>&1)
    _rc=$?
    if [ $_rc = 0 ] && [ "$_out" = "$2" ]; then
      _devs="$_devs $1=$2"
    else
      _bad="$_bad $1: rc=$_rc $(echo "$_out" | xv_oneline)"
    fi
  done
  if [ -z "$_bad" ]; then
    mx_check "$_d" attach PASS "xenvirtio-backend attach:$_devs (image $_img, ${MX_IMAGE_MB} MiB)"
  else
    mx_check "$_d" attach FAIL "$_bad"
  fi
}

# mx_grant_usage_cell DOMAIN EXPECTED: the effective grant_usage the backend published for
# DOMAIN's devices (PROTOCOL.md 2.2, 10.5), and ACCESS_PLATFORM exactly when it is 1.
mx_grant_usage_cell() {
  local _d _want _bad _gu _f _ap _i
  _d=$1 _want=$2 _bad=
  for _i in 0 1 2; do
    if ! mx_wait_backend_state "$_d" "$_i" 2 30; then
      _bad="$_bad devid $_i not at InitWait (state $(xenstore-read "$(mx_bdir "$_d" "$_i")/state" 2>&1))"
      continue
    fi
    _gu=$(xenstore-read "$(mx_bdir "$_d" "$_i")/grant_usage" 2>&1)
    _f=$(xenstore-read "$(mx_bdir "$_d" "$_i")/device-features" 2>&1)
    # ACCESS_PLATFORM is bit 33: the ninth hex digit from the right, bit 1.
    _ap=$(( (0x${_f#0x} >> 33) & 1 ))
    [ "$_gu" = "$_want" ] && [ "$_ap" = "$_want" ] ||
      _bad="$_bad devid $_i: grant_usage=$_gu ACCESS_PLATFORM=$_ap (features $_f)"
  done
  if [ -z "$_bad" ]; then
    mx_check "$_d" grant-usage PASS "effective grant_usage=$_want on devids 0-2, ACCESS_PLATFORM=$_want (toolstack wrote $(xenstore-read "$(mx_bdir "$_d" 0)/toolstack-grant-usage" 2>&1))"
  else
    mx_check "$_d" grant-usage FAIL "expected $_want:$_bad"
  fi
}

# mx_image_cell DOMAIN NAME SEED OFFSET LENGTH: from Dom0, the backend's image of DOMAIN holds
# exactly the pattern of SEED over [OFFSET, OFFSET+LENGTH).
mx_image_cell() {
  local _out _rc
  _out=$($MX_FE verify --check-image "$(mx_image "$1")" --seed "$3" --offset "$4" --length "$5" 2>&1)
  _rc=$?
  if [ $_rc = 0 ] && mx_line '^OK: ' "$_out" >/dev/null; then
    mx_check "$1" "$2" PASS "$(mx_line 'checked' "$_out" | sed 's/ in [0-9.]*s ([0-9.]* MiB\/s)//')"
  else
    mx_check "$1" "$2" FAIL "rc=$_rc: $(echo "$_out" | tail -n 2 | xv_oneline)"
  fi
}

# mx_blk_cell DOMAIN STRATEGY CELL [FRONTEND ARGS...]: `xenvirtio-frontend verify` on blk in
# DOMAIN with STRATEGY (auto: the role's default) over cell number CELL's range, then the image
# from Dom0. Checks blk-STRATEGY and image-STRATEGY. Sets MX_USED to the strategy the frontend
# reported.
mx_blk_cell() {
  local _d _s _n _seed _off _out _rc _used _line _why
  _d=$1 _s=$2 _n=$3
  shift 3
  _seed=$((_n * 1000 + $(mx_domid "$_d") + 7))
  # auto writes at an odd offset: partial sectors are read, merged and written back.
  _off=$((_n * MX_CELL_BYTES))
  [ "$_s" = auto ] && _off=$((_off + 1000))
  _out=$(mx_in "$_d" 180 "$MX_FE verify --devid 0 $(mx_dma_args "$_s") $* --seed $_seed --offset $_off --length $MX_LEN")
  _rc=$?
  _line=$(mx_line '^wrote ' "$_out")
  _used=$(echo "$_line" | sed -n 's/.* over dma \([a-z]*\).*/\1/p')
  MX_USED=$_used
  _why=
  [ $_rc = 0 ] || _why="rc=$_rc"
  mx_line '^OK: the data matches' "$_out" >/dev/null || _why="$_why no OK line"
  [ "$_s" = auto ] || [ "$_used" = "$_s" ] || _why="$_why used dma '$_used' instead of $_s"
  case " $* " in
    *" --no-persistent "*) case $_line in *persistent*) _why="$_why persistent grants despite --no-persistent" ;; esac ;;
    *) [ "$_s" != grant ] || case $_line in *"(persistent grants)"*) ;; *) _why="$_why grant without persistent grants" ;; esac ;;
  esac
  if [ -z "$_why" ]; then
    mx_check "$_d" "blk-$_s" PASS "$_line; $(mx_line 'checked' "$_out" | sed 's/.*checked //; s/: expected.*//')"
  else
    mx_check "$_d" "blk-$_s" FAIL "$_why: $(echo "$_out" | tail -n 3 | xv_oneline)"
  fi
  mx_image_cell "$_d" "image-$_s" "$_seed" "$_off" "$MX_LEN"
}

# mx_console_cell DOMAIN STRATEGY [FRONTEND ARGS...]: a line from DOMAIN's console frontend to
# the backend's pty (the `tty` key, read here in Dom0), and a line back. Check console-STRATEGY.
mx_console_cell() {
  local _d _s _tty _tok _to_host _to_guest _catpid _end _out _rc _host _why _dma
  _d=$1 _s=$2
  shift 2
  _tty=$(xenstore-read "$(mx_bdir "$_d" 1)/tty" 2>&1)
  if [ ! -c "$_tty" ]; then
    mx_check "$_d" "console-$_s" FAIL "the backend's tty key is '$_tty', not a terminal"
    return
  fi
  _tok=$(tr -d ' .' </proc/uptime)
  _to_host="from-$_d-$_s-$_tok"
  _to_guest="to-$_d-$_s-$_tok"
  timeout 90 cat "$_tty" >"$MX_RUN/console.host" 2>&1 &
  _catpid=$!
  _out=$(mx_in "$_d" 20 "mx_probe_console_start 1 $_to_host $(mx_dma_args "$_s") $*")
  _rc=$?
  _why=
  [ $_rc = 0 ] || _why="starting the frontend: rc=$_rc $(echo "$_out" | xv_oneline)"
  _end=$(($(xv_uptime) + 60))
  until grep -q "$_to_host" "$MX_RUN/console.host"; do
    if [ "$(xv_uptime)" -ge "$_end" ]; then
      _why="$_why; '$_to_host' never reached the pty"
      break
    fi
    sleep 0.3
  done
  echo "$_to_guest" >"$_tty"
  _out=$(mx_in "$_d" 90 "mx_probe_console_wait")
  kill "$_catpid" 2>/dev/null
  wait "$_catpid" 2>/dev/null
  _dma=$(mx_line 'connected, dma' "$_out" | sed -n 's/.*connected, dma \([a-z]*\).*/\1/p')
  mx_line "^$_to_guest\$" "$_out" >/dev/null || _why="$_why; '$_to_guest' did not come back"
  mx_line '^rc=0$' "$_out" >/dev/null || _why="$_why; $(mx_line '^rc=' "$_out")"
  [ "$_s" = auto ] || [ "$_dma" = "$_s" ] || _why="$_why; used dma '$_dma' instead of $_s"
  if [ -z "$_why" ]; then
    mx_check "$_d" "console-$_s" PASS "a line each way through $_tty (dma $_dma$(case " $* " in *" --no-persistent "*) echo ', per-request grants' ;; esac))"
  else
    mx_check "$_d" "console-$_s" FAIL "${_why#; }; frontend: $(echo "$_out" | tail -n 3 | xv_oneline)"
  fi
}

# mx_rng_cell DOMAIN STRATEGY [FRONTEND ARGS...]: 4096 bytes from DOMAIN's rng device; they must
# look random (at least 240 of the 256 byte values: for 4096 random bytes a value is missing
# with probability (255/256)^4096, about 1e-7). Check rng-STRATEGY.
mx_rng_cell() {
  local _d _s _out _rc _n _k _why _dma
  _d=$1 _s=$2
  shift 2
  _out=$(mx_in "$_d" 60 "mx_probe_rng 2 $(mx_dma_args "$_s") $*")
  _rc=$(echo "$_out" | sed -n 's/^rc=\([0-9]*\) .*/\1/p' | tail -n 1)
  _n=$(echo "$_out" | sed -n 's/.* bytes=\([0-9]*\) .*/\1/p' | tail -n 1)
  _k=$(echo "$_out" | sed -n 's/.* distinct=\([0-9]*\).*/\1/p' | tail -n 1)
  _dma=$(echo "$_out" | sed -n 's/.*connected, dma \([a-z]*\).*/\1/p' | tail -n 1)
  _why=
  [ "$_rc" = 0 ] || _why="rc=${_rc:-?}"
  [ "$_n" = 4096 ] || _why="$_why got ${_n:-no} bytes"
  [ "${_k:-0}" -ge 240 ] || _why="$_why only ${_k:-?} distinct byte values"
  [ "$_s" = auto ] || [ "$_dma" = "$_s" ] || _why="$_why used dma '$_dma' instead of $_s"
  if [ -z "$_why" ]; then
    mx_check "$_d" "rng-$_s" PASS "4096 bytes, $_k distinct byte values (dma $_dma$(case " $* " in *" --no-persistent "*) echo ', per-request grants' ;; esac))"
  else
    mx_check "$_d" "rng-$_s" FAIL "$_why: $(echo "$_out" | xv_oneline)"
  fi
}

# mx_strategy_cells DOMAIN STRATEGY CELL: blk (verify + image), console and rng with STRATEGY.
# Under grant, blk uses persistent grants and console and rng per-request grants, so that both
# mapping paths of the backend run in every role.
mx_strategy_cells() {
  mx_blk_cell "$1" "$2" "$3"
  if [ "$2" = grant ]; then
    mx_console_cell "$1" "$2" --no-persistent
    mx_rng_cell "$1" "$2" --no-persistent
  else
    mx_console_cell "$1" "$2"
    mx_rng_cell "$1" "$2"
  fi
}

# mx_auto_cells DOMAIN EXPECTED CELL: no --dma: blk, console and rng, then from Dom0 the `dma`
# key of the blk device must be EXPECTED, the policy table's strategy for this role.
mx_auto_cells() {
  local _d _want _got _why
  _d=$1 _want=$2
  mx_blk_cell "$_d" auto "$3"
  _got=$(xenstore-read "$(mx_fdir "$_d" 0)/dma" 2>&1)
  _why=$(xenstore-read "$(mx_fdir "$_d" 0)/dma-reason" 2>&1)
  if [ "$_got" = "$_want" ] && [ "$MX_USED" = "$_want" ]; then
    mx_check "$_d" dma-auto PASS "dma=$_got as the policy table says; dma-reason: $_why"
  else
    mx_check "$_d" dma-auto FAIL "dma key '$_got', verify used '$MX_USED', expected $_want; dma-reason: $_why"
  fi
  mx_console_cell "$_d" auto
  mx_rng_cell "$_d" auto
}

# mx_refusal_cell DOMAIN WHY-PATTERN: `--dma direct` must be refused by the frontend's policy
# with the documented error (its reason matching WHY-PATTERN), nothing connected, and the
# refusal written to the device's error node with state Closed (PROTOCOL.md 8.6).
mx_refusal_cell() {
  local _d _out _rc _err _st _why
  _d=$1
  _out=$(mx_in "$_d" 60 "$MX_FE verify --devid 0 --dma direct --length 4096")
  _rc=$?
  _err=$(xenstore-read "$(mx_fdir "$_d" 0)/error" 2>&1)
  _st=$(xenstore-read "$(mx_fdir "$_d" 0)/state" 2>&1)
  _why=
  [ $_rc = 2 ] || _why="rc=$_rc (expected 2)"
  mx_line "DMA strategy direct is refused: .*$2" "$_out" >/dev/null || _why="$_why; not the documented error"
  case $_err in *"direct is refused"*) ;; *) _why="$_why; error node '$_err'" ;; esac
  [ "$_st" = 6 ] || _why="$_why; frontend state $_st (expected 6)"
  if [ -z "$_why" ]; then
    mx_check "$_d" direct-refused PASS "$(mx_line 'refused' "$_out" | sed 's/^xenvirtio-frontend: //')"
  else
    mx_check "$_d" direct-refused FAIL "${_why#; }: $(echo "$_out" | tail -n 2 | xv_oneline)"
  fi
}

# mx_nbd_cell DOMAIN NAME SOCKET CELL: `verify --nbd SOCKET` inside DOMAIN (through its
# `serve`), then the image from Dom0. Checks NAME and image-NAME.
mx_nbd_cell() {
  local _d _name _sock _seed _off _out _rc
  _d=$1 _name=$2 _sock=$3
  _seed=$(($4 * 1000 + $(mx_domid "$_d") + 11))
  _off=$(($4 * MX_CELL_BYTES))
  _out=$(mx_in "$_d" 180 "$MX_FE verify --nbd $_sock --seed $_seed --offset $_off --length $MX_LEN")
  _rc=$?
  if [ $_rc = 0 ] && mx_line '^OK: ' "$_out" >/dev/null; then
    mx_check "$_d" "$_name" PASS "$(mx_line 'checked' "$_out" | sed 's/: expected.*//')"
  else
    mx_check "$_d" "$_name" FAIL "rc=$_rc: $(echo "$_out" | tail -n 3 | xv_oneline)"
  fi
  mx_image_cell "$_d" "image-$_name" "$_seed" "$_off" "$MX_LEN"
}

# mx_bench_cell DOMAIN STRATEGY PATTERN BS [FRONTEND OPTIONS...]: `xenvirtio-frontend bench`
# of blk 0 for 3 s at depth 16 (512 pages of DMA memory), and the daemon's counters of the device before and after. A
# figure, not a timed assertion: the check fails only when the bench does not run, does not use
# STRATEGY, or completes nothing. The detail holds IOPS, MiB/s, p50, and per request the
# backend's map calls and pages mapped and both sides' notifications. Sets MX_IOPS.
mx_bench_cell() {
  local _d _s _pat _bs _name _domid _before _after _out _rc _head _ops _why _req _per
  _d=$1 _s=$2 _pat=$3 _bs=$4
  shift 4
  _name="bench-$_pat-$((_bs / 1024))k-$_s"
  case " $* " in *" --no-persistent "*) _name="$_name-per-request" ;; esac
  _domid=$(mx_domid "$_d")
  _before=$(mx_device_json "$_domid" 0)
  _out=$(mx_in "$_d" 120 "$MX_FE bench --devid 0 --dma $_s $* --pattern $_pat --bs $_bs --depth 16 --dma-pages 512 --seconds 3")
  _rc=$?
  _after=$(mx_device_json "$_domid" 0)
  _head=$(mx_line ' dma=' "$_out")
  _ops=$(mx_line ' requests: ' "$_out" | sed -n 's/^ *\([0-9]*\) requests: \([0-9]*\) IOPS, \([0-9.]*\) MiB\/s.*/\1 \2 \3/p')
  MX_IOPS=$(echo "$_ops" | cut -d' ' -f2)
  _why=
  [ $_rc = 0 ] || _why="rc=$_rc"
  case $_head in *" dma=$_s"*) ;; *) _why="$_why not dma=$_s: '$_head'" ;; esac
  [ "${_ops%% *}" -gt 0 ] 2>/dev/null || _why="$_why no request completed"
  if [ -n "$_why" ]; then
    mx_check "$_d" "$_name" FAIL "$_why: $(echo "$_out" | tail -n 3 | xv_oneline)"
    return 1
  fi
  _req=$(($(mx_json_num requests "$_after") - $(mx_json_num requests "$_before")))
  mx_check "$_d" "$_name" PASS "$(echo "$_ops" | awk '{ printf "%s IOPS, %s MiB/s", $2, $3 }'), $(mx_line 'latency:' "$_out" | sed 's/^ *latency: //; s/ p90.*//'); backend per request: $(mx_bench_per map_calls) map calls, $(mx_bench_per pages_mapped) pages mapped, $(mx_bench_per notifications_sent) notifications sent, $(mx_bench_per notifications_received) received ($_req requests); $(echo "$_head" | sed 's/^ *//')"
}

# mx_bench_per KEY: the backend's KEY per request between mx_bench_cell's two samples.
mx_bench_per() {
  awk -v a="$(mx_json_num "$1" "$_after")" -v b="$(mx_json_num "$1" "$_before")" -v n="$_req" \
    'BEGIN { if (n > 0) printf "%.2f", (a - b) / n; else printf "-" }'
}

# mx_bench_cells DOMAIN STRATEGIES: the bench per strategy (grant twice: persistent and per
# request) for 4 KiB random reads and 64 KiB sequential reads, then the IOPS of each relative
# to the first that ran (per-request grants when STRATEGIES starts with grant).
mx_bench_cells() {
  local _d _pat _bs _s _base _ratios
  _d=$1
  shift
  for _pat in randread:4096 read:65536; do
    _bs=${_pat#*:} _pat=${_pat%:*}
    _base='' _ratios=''
    for _s in "$@"; do
      if [ "$_s" = grant ]; then
        mx_bench_cell "$_d" grant "$_pat" "$_bs" --no-persistent && _base=$MX_IOPS
        _ratios="$_ratios grant-per-request=1"
      fi
      mx_bench_cell "$_d" "$_s" "$_pat" "$_bs" || continue
      [ -n "$_base" ] || { _base=$MX_IOPS; _ratios="$_ratios $_s=1"; continue; }
      _ratios="$_ratios $_s=$(awk -v a="$MX_IOPS" -v b="$_base" 'BEGIN { printf "%.2f", a / b }')"
    done
    mx_check "$_d" "bench-$_pat-$((_bs / 1024))k-ratios" PASS "IOPS relative to the first:$_ratios (same run, same domain, under TCG)"
  done
}
