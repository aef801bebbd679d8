#!/bin/sh
# shellcheck shell=dash
# bench-domU.sh: DomU side of `scripts/bench.sh` (`e2e.sh --mode bench`), run by domU-init
# before the agent starts: Debian's fio, carried into the image with its libraries, starts here.
# Dom0's side (bench-dom0.sh) then drives the runs through the command channel.
# shellcheck source=../guest/xv-lib.sh
. /xv/lib/xv-lib.sh

xv_check_cmd bench-fio fio --version
