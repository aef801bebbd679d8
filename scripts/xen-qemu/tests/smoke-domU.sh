#!/bin/sh
# shellcheck shell=dash
# smoke-domU.sh: DomU side of `scripts/e2e.sh --smoke`, run by domU-init before the agent starts.
# Dom0's side (smoke-dom0.sh) then drives this DomU through the command channel.
# shellcheck source=../guest/xv-lib.sh
. /xv/lib/xv-lib.sh
# shellcheck source=common.sh
. /xv/tests/common.sh

xv_check_domain_basics
# xenstore through /dev/xen/xenbus: this domain's own name, as the toolstack wrote it
xv_check_eq xenstore-name "$XV_DOM" "$(xenstore-read name 2>&1)" "(xenstore-read name via /dev/xen/xenbus)"
