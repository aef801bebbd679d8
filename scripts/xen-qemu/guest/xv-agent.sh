#!/bin/sh
# shellcheck shell=dash
# xv-agent.sh: the DomU end of the e2e command channel (Dom0 end: xv_domu_run in xv-lib.sh).
# Runs forever. Transport, for now: Debian's xenstore-* tools over /dev/xen/xenbus; the same
# keys will be served by a project binary once the Rust xenstore client exists. Keys, below
# B=/local/domain/<self>/data/xenvirtio-agent (docs/E2E.md, "Command channel"):
#   B/ready = 1               written by the agent once it serves requests
#   B/req/<seq>/timeout       Dom0: seconds the command may run
#   B/req/<seq>/cmd           Dom0: base64 of the command for `sh -c`; written after timeout
#   B/rsp/<seq>/out/<i>       agent: base64 of bytes [1536*i, 1536*(i+1)) of the output
#   B/rsp/<seq>/chunks        agent: number of out/<i> nodes
#   B/rsp/<seq>/rc            agent: exit status, written last (the completion marker)
# Dom0 removes B/req/<seq> and B/rsp/<seq> once it has read the answer. Requests run one at a
# time, in the order their cmd nodes appear. Every xenstore-* exec costs 0.2-0.6 s under TCG, so
# the agent does two per request: one read, one write of the whole answer.
# Usage: xv-agent.sh [BASE]   (BASE defaults to the path above; tests pass another one)

# shellcheck source=xv-lib.sh
. "${XV_LIB:-/xv/lib/xv-lib.sh}"

XV_AGENT_MAX_OUT=24576 # output bytes sent back (the tail); 16 chunks of 1536
XV_AGENT_CHUNK=1536    # a multiple of 3: chunks concatenate into one valid base64 stream

if [ -n "${1:-}" ]; then
  base=$1
else
  domid=$(xenstore-read domid) || { echo "xv-agent: cannot read my domid from xenstore"; exit 1; }
  base=/local/domain/$domid/$XV_AGENT_KEY
fi
state=$XV_RUN/agent
mkdir -p "$state"

# serve SEQ: run one request and publish its answer.
serve() {
  local seq req tmo rc size n i
  seq=$1
  [ -e "$state/$seq.taken" ] && return 0
  # one read, two lines: the timeout, then the base64 command
  req=$(xenstore-read "$base/req/$seq/timeout" "$base/req/$seq/cmd" 2>/dev/null) || return 0
  : >"$state/$seq.taken"
  tmo=${req%%"$NL"*}
  case $tmo in '' | *[!0-9]*) tmo=60 ;; esac
  printf '%s' "${req#*"$NL"}" | base64 -d >"$state/$seq.cmd" 2>/dev/null
  echo "xv-agent: [$seq] (timeout ${tmo}s) $(xv_oneline <"$state/$seq.cmd")"
  timeout -k 5 "$tmo" sh "$state/$seq.cmd" </dev/null >"$state/$seq.out" 2>&1
  rc=$?
  size=$(wc -c <"$state/$seq.out")
  if [ "$size" -gt "$XV_AGENT_MAX_OUT" ]; then
    tail -c "$XV_AGENT_MAX_OUT" "$state/$seq.out" >"$state/$seq.tail"
    mv "$state/$seq.tail" "$state/$seq.out"
    size=$XV_AGENT_MAX_OUT
  fi
  n=$(((size + XV_AGENT_CHUNK - 1) / XV_AGENT_CHUNK))
  # one write of every node; rc last
  set --
  i=0
  while [ "$i" -lt "$n" ]; do
    set -- "$@" "$base/rsp/$seq/out/$i" \
      "$(dd if="$state/$seq.out" bs="$XV_AGENT_CHUNK" skip="$i" count=1 2>/dev/null | base64 -w0)"
    i=$((i + 1))
  done
  xenstore-write "$@" "$base/rsp/$seq/chunks" "$n" "$base/rsp/$seq/rc" "$rc" ||
    echo "xv-agent: [$seq] cannot write the answer"
  rm -f "$state/$seq.out" "$state/$seq.cmd"
}

# serve_pending: serve every request not taken yet, oldest first (after a (re)started watch).
serve_pending() {
  local seq
  for seq in $(xenstore-list "$base/req" 2>/dev/null | sort -n); do
    serve "$seq"
  done
}

NL='
'
xenstore-write "$base/ready" 1 || { echo "xv-agent: cannot write $base/ready"; exit 1; }
echo "xv-agent: serving $base"
# The watch fires once when it is set (then requests written before are served), and then
# for every node written below req/: only cmd nodes matter. If the watch ever dies (xenstored
# restarted), set it again.
while :; do
  xenstore-watch "$base/req" | while read -r path; do
    case $path in
      "$base/req/"*/cmd) seq=${path#"$base/req/"}; serve "${seq%/cmd}" ;;
      "$base/req") serve_pending ;; # the event of setting the watch
    esac
  done
  sleep 1
done
