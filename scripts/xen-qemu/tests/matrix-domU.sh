#!/bin/sh
# shellcheck shell=dash
# matrix-domU.sh: DomU side of the full matrix, run by domU-init before the agent starts.
# Everything here is driven from Dom0 (matrix-dom0.sh) through the command channel: the
# frontend runs when Dom0 asks, with the options of each cell.
exit 0
