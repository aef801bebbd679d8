#!/bin/sh
# shellcheck shell=dash
# net-domU.sh: DomU side of `scripts/e2e.sh --mode net`, run by domU-init before the agent
# starts. Everything is driven from Dom0 (net-dom0.sh) through the command channel.
exit 0
