#!/bin/sh
# shellcheck shell=dash
# demo-domU.sh: DomU side of scripts/demo.sh, run by domU-init before the agent starts.
# Everything here is driven from Dom0 (demo-dom0.sh) through the command channel: the
# frontend runs when Dom0 asks, to copy data onto its disk.
exit 0
