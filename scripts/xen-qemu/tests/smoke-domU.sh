#!/bin/sh
# shellcheck shell=dash
# smoke-domU.sh: DomU side of `scripts/e2e.sh --smoke`, run by domU-init before the agent starts.
# Dom0's side (smoke-dom0.sh) then drives this DomU through the command channel.
# shellcheck source=../guest/xv-lib.sh
. /xv/lib/xv-lib.sh
# shellcheck source=common.sh
. /xv/tests/common.sh

xv_check_domain_basics
# The ways this guest's kernel can take a disk from the frontend.
xv_check_kernel_paths

# The cross-domain checks, DomU side: grant a page and offer a port to Dom0, pin a page, publish
# them through /dev/xen/xenbus, then wait for Dom0's side (smoke-dom0.sh runs cross-dom0). It runs
# in the background, so that the agent starts meanwhile; its check lines (cross-*) reach the
# console from here, and cross.rc tells Dom0 it has finished.
(
  xv_check_lines cross- xenvirtio-selftest cross-domu --foreign "$(xv_expect_foreign_map "$XV_DOM")"
  echo $? >"$XV_RUN/cross.rc.tmp" && mv "$XV_RUN/cross.rc.tmp" "$XV_RUN/cross.rc"
) </dev/null &
