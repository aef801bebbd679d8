# shellcheck shell=dash
# net-lib.sh: the virtio-net cells (issue 15), sourced after matrix-lib.sh by matrix-dom0.sh and
# net-dom0.sh, and in the DomUs by the command channel. Dom0 has a bridge with an address; each
# DomU gets a net device whose TAP joins it (xenvirtio-backend attach --type net), and its
# frontend makes the guest's interface a TAP (serve --net-ifname). Per strategy the role allows:
# the interface's address, ping both ways, and a TCP stream each way whose bytes are compared by
# their SHA-256 at both ends. Every cell emits its own check line; nothing is skipped.

NET_BRIDGE=xenbr0
NET_HOST=10.200.0.1
NET_DEVID=3
NET_IF=xvnet$NET_DEVID
NET_PORT=5001
# The stream of each direction, in MiB (issue 15: at least 64).
NET_MB=${XV_NET_MB:-4}
NET_BLOB=$MX_RUN/net-blob.bin
# Whether the strategy cells run the TCP streams (net-dom0.sh does; the full matrix does not
# yet: on real Xen a stream crawls, docs/E2E.md "virtio-net").
NET_STREAM=${NET_STREAM:-1}
# How long one direction of a stream may take.
NET_SEND_TIMEOUT=${XV_NET_SEND_TIMEOUT:-90}

# ---------------------------------------------------------------------------------------------
# Probes: run in the domain under test.
# ---------------------------------------------------------------------------------------------

# net_probe_serve DEVID IFNAME ADDR [SERVE ARGS...]: start `serve` for the net device DEVID as the
# interface IFNAME, give it ADDR/24, and print serve's device line.
net_probe_serve() {
  local _d _if _addr _end
  _d=$1 _if=$2 _addr=$3
  shift 3
  modprobe tun 2>/dev/null
  RUST_LOG=xenvirtio_frontend=info $MX_FE serve --devid "$_d" --net-ifname "$_if" "$@" \
    </dev/null >"$MX_RUN/net-serve.log" 2>&1 &
  echo $! >"$MX_RUN/net-serve.pid"
  _end=$(($(xv_uptime) + 120))
  until grep -q "^device $_d: net on interface" "$MX_RUN/net-serve.log" 2>/dev/null; do
    if [ "$(xv_uptime)" -ge "$_end" ] || ! xv_alive "$(cat "$MX_RUN/net-serve.pid")"; then
      echo "serve did not bring up $_if within 120s: $(tail -n 8 "$MX_RUN/net-serve.log" | cut -c1-300 | xv_oneline)"
      return 1
    fi
    sleep 0.3
  done
  if ! ip addr add "$_addr/24" dev "$_if" 2>&1; then
    echo "ip addr add $_addr/24 dev $_if failed"
    return 1
  fi
  grep -m 1 "^device $_d: net on interface" "$MX_RUN/net-serve.log"
}

# net_probe_stop: stop the running net `serve` and wait until it has exited; print its last
# lines if it failed.
net_probe_stop() {
  local _p
  _p=$(cat "$MX_RUN/net-serve.pid" 2>/dev/null) || return 0
  kill "$_p" 2>/dev/null
  while xv_alive "$_p"; do sleep 0.3; done
  rm -f "$MX_RUN/net-serve.pid"
}

# net_probe_blob MIB: a file of MIB MiB of random bytes at $NET_BLOB (kept across cells); print
# its SHA-256.
net_probe_blob() {
  if [ "$(stat -c %s "$NET_BLOB" 2>/dev/null)" != $(($1 * 1024 * 1024)) ]; then
    head -c $(($1 * 1024 * 1024)) /dev/urandom >"$NET_BLOB" || return 1
  fi
  sha256sum "$NET_BLOB" | cut -d' ' -f1
}

# net_probe_listen FILE: receive one TCP stream on $NET_PORT into FILE, in the background.
# busybox nc ends when its stdin ends, so its stdin is a pipe from a sleep that
# net_probe_received kills once the stream is in.
net_probe_listen() {
  rm -f "$1" "$MX_RUN/net-listen.pid"
  # Every descriptor redirected: the command channel answers only once its output ends.
  (
    sleep 900 &
    echo $! >"$MX_RUN/net-listen.pid"
    wait
  ) </dev/null 2>/dev/null | nc -l -p "$NET_PORT" >"$1" 2>/dev/null &
  while [ ! -s "$MX_RUN/net-listen.pid" ]; do sleep 0.1; done
  sleep 0.5
  echo "listening on port $NET_PORT"
}

# net_probe_received FILE BYTES SECONDS: wait until FILE holds BYTES bytes (or SECONDS pass),
# stop the listener, and print the size and SHA-256 of FILE.
net_probe_received() {
  local _end _n
  _end=$(($(xv_uptime) + $3))
  while [ "$(stat -c %s "$1" 2>/dev/null || echo 0)" -lt "$2" ] && [ "$(xv_uptime)" -lt "$_end" ]; do
    sleep 0.5
  done
  sleep 0.5
  kill "$(cat "$MX_RUN/net-listen.pid" 2>/dev/null)" 2>/dev/null
  _n=$(stat -c %s "$1" 2>/dev/null || echo 0)
  echo "$_n $(sha256sum "$1" 2>/dev/null | cut -d' ' -f1)"
}

# net_probe_send ADDR FILE SECONDS: send FILE as one TCP stream to ADDR:$NET_PORT, giving up
# after SECONDS; print the seconds it took.
net_probe_send() {
  local _t0 _rc
  _t0=$(cut -d' ' -f1 /proc/uptime)
  timeout "$3" nc "$1" "$NET_PORT" <"$2"
  _rc=$?
  echo "$_t0 $(cut -d' ' -f1 /proc/uptime)" | awk '{ printf "%.1f\n", $2 - $1 }'
  return $_rc
}

# ---------------------------------------------------------------------------------------------
# Cells: run in Dom0.
# ---------------------------------------------------------------------------------------------

# net_addr DOMAIN: the DomU's address on the bridge.
net_addr() {
  echo "10.200.0.$((10 + $(mx_domid "$1")))"
}

# net_bridge_cell: the bridge the TAPs join, with Dom0's address on it (check net-bridge).
net_bridge_cell() {
  local _out
  if ! _out=$(modprobe bridge 2>&1 && modprobe tun 2>&1); then
    xv_check net-bridge FAIL "modprobe bridge tun: $(echo "$_out" | xv_oneline)"
    return 1
  fi
  if ! _out=$({ brctl addbr "$NET_BRIDGE" && ip addr add "$NET_HOST/24" dev "$NET_BRIDGE" &&
    ip link set "$NET_BRIDGE" up; } 2>&1); then
    xv_check net-bridge FAIL "brctl addbr $NET_BRIDGE, ip addr add $NET_HOST/24: $(echo "$_out" | xv_oneline)"
    return 1
  fi
  xv_check net-bridge PASS "bridge $NET_BRIDGE up with $NET_HOST/24 (modules bridge, tun)"
}

# net_attach_cell DOMAIN: a net device for DOMAIN on the bridge; its TAP must exist in Dom0 as a
# port of the bridge once the backend published the device (check net-attach).
net_attach_cell() {
  local _d _id _mac _out _rc _tap _master
  _d=$1
  _id=$(mx_domid "$_d")
  _mac=$(printf '00:16:3e:00:%02x:%02x' "$_id" "$NET_DEVID")
  _out=$($MX_BE attach --quiet --domain "$_id" --type net --devid "$NET_DEVID" \
    --bridge "$NET_BRIDGE" --mac "$_mac" 2>&1)
  _rc=$?
  if [ $_rc != 0 ] || [ "$_out" != "$NET_DEVID" ]; then
    mx_check "$_d" net-attach FAIL "attach --type net: rc=$_rc $(echo "$_out" | xv_oneline)"
    return 1
  fi
  if ! mx_wait_backend_state "$_d" "$NET_DEVID" 2 30; then
    mx_check "$_d" net-attach FAIL "the backend did not reach InitWait: state $(xenstore-read "$(mx_bdir "$_d" "$NET_DEVID")/state" 2>&1), error: $(xenstore-read "$(mx_bdir "$_d" "$NET_DEVID")/error" 2>&1 | xv_oneline)"
    return 1
  fi
  _tap=$(xenstore-read "$(mx_bdir "$_d" "$NET_DEVID")/tap" 2>/dev/null)
  _master=$(basename "$(readlink "/sys/class/net/$_tap/master" 2>/dev/null)" 2>/dev/null)
  if [ "$_tap" = "xvn$_id.$NET_DEVID" ] && [ "$_master" = "$NET_BRIDGE" ] &&
    [ "$(cat "/sys/class/net/$_tap/operstate" 2>/dev/null)" != "" ]; then
    mx_check "$_d" net-attach PASS "device $NET_DEVID mac $_mac: TAP $_tap in Dom0, a port of $NET_BRIDGE"
  else
    mx_check "$_d" net-attach FAIL "TAP '$_tap' (want xvn$_id.$NET_DEVID), master '$_master' (want $NET_BRIDGE)"
    return 1
  fi
}

# net_strategy_cells DOMAIN STRATEGY: serve the net device with STRATEGY (auto: the role's
# choice), then net-serve, net-dma, net-ping and net-stream checks, each NAME-STRATEGY.
net_strategy_cells() {
  local _d _s _want _addr _out _rc _dma _sum _got _secs _mib
  _d=$1 _s=$2
  _want=$_s
  [ "$_s" != auto ] || _want=$(mx_default_dma "$_d")
  _addr=$(net_addr "$_d")
  # shellcheck disable=SC2046 # the options are words
  _out=$(mx_in "$_d" 150 "net_probe_serve $NET_DEVID $NET_IF $_addr $(mx_dma_args "$_s")")
  _rc=$?
  if [ $_rc != 0 ]; then
    mx_check "$_d" "net-serve-$_s" FAIL "rc=$_rc: $(echo "$_out" | tail -n 3 | xv_oneline)"
    mx_in "$_d" 40 net_probe_stop >/dev/null
    return 1
  fi
  mx_check "$_d" "net-serve-$_s" PASS "$(echo "$_out" | tail -n 1 | xv_oneline); $NET_IF has $_addr/24"
  _dma=$(xenstore-read "$(mx_fdir "$_d" "$NET_DEVID")/dma" 2>/dev/null)
  if [ "$_dma" = "$_want" ]; then
    mx_check "$_d" "net-dma-$_s" PASS "dma=$_dma ($(xenstore-read "$(mx_fdir "$_d" "$NET_DEVID")/dma-reason" 2>/dev/null | xv_oneline))"
  else
    mx_check "$_d" "net-dma-$_s" FAIL "dma='$_dma', want $_want"
  fi

  # ping, both ways (the first packets also resolve the addresses).
  # Small packets, then full-size frames (1472 bytes of ICMP payload fill a 1500-byte MTU).
  _out=$(mx_in "$_d" 60 "ping -c 3 -W 10 $NET_HOST && ping -c 2 -W 10 -s 1472 $NET_HOST" 2>&1)
  _rc=$?
  local _back _brc
  _back=$(ping -c 3 -W 10 "$_addr" 2>&1 && ping -c 2 -W 10 -s 1472 "$_addr" 2>&1)
  _brc=$?
  if [ $_rc = 0 ] && [ $_brc = 0 ]; then
    mx_check "$_d" "net-ping-$_s" PASS "$_d -> Dom0: $(echo "$_out" | grep -m 1 'packets transmitted' | xv_oneline); Dom0 -> $_d: $(echo "$_back" | grep -m 1 'round-trip' | xv_oneline)"
  else
    mx_check "$_d" "net-ping-$_s" FAIL "$_d -> $NET_HOST rc=$_rc: $(echo "$_out" | tail -n 2 | xv_oneline); Dom0 -> $_addr rc=$_brc: $(echo "$_back" | tail -n 2 | xv_oneline)"
  fi

  # A stream each way, its bytes compared at both ends.
  if [ "$NET_STREAM" != 1 ]; then
    mx_in "$_d" 40 net_probe_stop >/dev/null
    return 0
  fi
  _mib=$NET_MB
  _sum=$(net_probe_blob "$_mib")
  _out=$(mx_in "$_d" 60 "net_probe_listen $MX_RUN/net-in.bin")
  case $_out in *listening*) ;; *) _out="the listener did not start: $(echo "$_out" | xv_oneline)" ;; esac
  _secs=$(net_probe_send "$_addr" "$NET_BLOB" "$NET_SEND_TIMEOUT" 2>&1)
  _rc=$?
  _got=$(mx_in "$_d" 120 "net_probe_received $MX_RUN/net-in.bin $((_mib * 1024 * 1024)) 60")
  local _in_ok _in_note
  if [ $_rc = 0 ] && [ "$_got" = "$((_mib * 1024 * 1024)) $_sum" ]; then
    _in_ok=1 _in_note="Dom0 -> $_d: $_mib MiB in ${_secs}s, sha256 equal"
  else
    _in_ok=0 _in_note="Dom0 -> $_d: $_out; send rc=$_rc (${_secs}), received '$(echo "$_got" | xv_oneline)', sent $((_mib * 1024 * 1024)) $_sum"
  fi
  _sum=$(mx_in "$_d" 300 "net_probe_blob $_mib")
  net_probe_listen "$MX_RUN/net-out.bin"
  _secs=$(mx_in "$_d" $((NET_SEND_TIMEOUT + 30)) "net_probe_send $NET_HOST $NET_BLOB $NET_SEND_TIMEOUT")
  _rc=$?
  _got=$(net_probe_received "$MX_RUN/net-out.bin" $((_mib * 1024 * 1024)) 60)
  if [ $_rc = 0 ] && [ "$_got" = "$((_mib * 1024 * 1024)) $_sum" ] && [ $_in_ok = 1 ]; then
    mx_check "$_d" "net-stream-$_s" PASS "$_in_note; $_d -> Dom0: $_mib MiB in $(echo "$_secs" | tail -n 1)s, sha256 equal"
  else
    mx_in "$_d" 40 net_probe_stop >/dev/null
    net_counters "$_d"
    mx_check "$_d" "net-stream-$_s" FAIL "daemon: $(grep -a -m 3 'dropped\|over the MTU' "$MX_BACKEND_LOG" | cut -c1-120 | xv_oneline); frontend: $(mx_in "$_d" 30 "grep -a -m 3 'dropped\|refused' $MX_RUN/net-serve.log" | cut -c1-120 | xv_oneline); $_in_note; $_d -> Dom0: send rc=$_rc ($(echo "$_secs" | tail -n 1 | xv_oneline)), received '$_got', sent $_sum; serve: $(mx_in "$_d" 30 "tail -n 4 $MX_RUN/net-serve.log" | xv_oneline); daemon: $(mx_device_json "$(mx_domid "$_d")" "$NET_DEVID" | xv_oneline)"
  fi
  rm -f "$MX_RUN/net-out.bin"
  mx_in "$_d" 40 "net_probe_stop; rm -f $MX_RUN/net-in.bin" >/dev/null
}

# net_counters DOMAIN: the kernel's own counters of both ends, printed to the serial log (not a
# check): each interface's line of /proc/net/dev, and the IP and TCP lines of /proc/net/snmp.
net_counters() {
  grep -E "xvn|$NET_BRIDGE" /proc/net/dev | sed 's/^/net counters, Dom0: /'
  grep -E '^(Ip|Tcp):' /proc/net/snmp | sed 's/^/net counters, Dom0: /'
  mx_in "$1" 30 "grep -E '$NET_IF' /proc/net/dev; grep -E '^(Ip|Tcp):' /proc/net/snmp" | sed "s/^/net counters, $1: /"
  echo "net counters, the daemon: $(mx_device_json "$(mx_domid "$1")" "$NET_DEVID")"
  mx_in "$1" 30 "grep -a 'net device counters' $MX_RUN/net-serve.log" | sed "s/^/net counters, $1's frontend: /"
}

# net_stats_cell DOMAIN: the daemon's record of the device: frames both ways, nothing dropped.
net_stats_cell() {
  local _j _r _w _drop
  _j=$(mx_device_json "$(mx_domid "$1")" "$NET_DEVID")
  _r=$(mx_json_num bytes_read "$_j")
  _w=$(mx_json_num bytes_written "$_j")
  _drop=$(mx_json_num dropped "$_j")
  if [ "${_r:-0}" -gt 0 ] && [ "${_w:-0}" -gt 0 ] && [ "$_drop" = 0 ]; then
    mx_check "$1" net-stats PASS "the daemon moved $_r bytes to the guest and $_w from it, dropped $_drop frames"
  else
    mx_check "$1" net-stats FAIL "bytes to the guest '$_r', from it '$_w', dropped '$_drop': $(echo "$_j" | xv_oneline)"
  fi
}

# net_detach_cell DOMAIN: detach the net device; its TAP must be gone from Dom0 (check
# net-detach).
net_detach_cell() {
  local _id _out _rc _tap
  _id=$(mx_domid "$1")
  _tap=xvn$_id.$NET_DEVID
  _out=$($MX_BE detach --domain "$_id" --devid "$NET_DEVID" 2>&1)
  _rc=$?
  sleep 1
  if [ $_rc = 0 ] && [ ! -e "/sys/class/net/$_tap" ]; then
    mx_check "$1" net-detach PASS "detach: the device and its TAP $_tap are gone"
  else
    mx_check "$1" net-detach FAIL "detach rc=$_rc $(echo "$_out" | xv_oneline); TAP $_tap $([ -e "/sys/class/net/$_tap" ] && echo "still there" || echo gone)"
  fi
}

# net_cells DOMAIN: every cell of one DomU: attach, each strategy the role allows (the role's
# default through its own choice, without --dma: `auto`), the daemon's counters, detach.
net_cells() {
  local _s
  net_attach_cell "$1" || return 1
  for _s in $(mx_strategies "$1") auto; do
    [ "$_s" != "$(mx_default_dma "$1")" ] || continue
    net_strategy_cells "$1" "$_s"
  done
  net_stats_cell "$1"
  net_detach_cell "$1"
}
