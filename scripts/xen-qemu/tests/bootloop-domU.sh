#!/bin/sh
# shellcheck shell=dash
# bootloop-domU.sh: DomU side of `scripts/e2e.sh --boot-loop N`: nothing to do; Dom0 only waits
# for the boot report of domU-init.
exit 0
