#!/usr/bin/env bash
# Multi-node training over ssh with DeepSpeed's default pdsh launcher.
#
#   HOSTFILE=infra/hostfile CONFIG=configs/paper.yaml bash infra/launch/multinode.sh [key=value ...]
#
# Run from the repository root on the first host of the hostfile. Needs pdsh and passwordless
# ssh to every host, and the repository plus its virtualenv at the same absolute path on each
# host (DeepSpeed runs `cd $PWD; <this python> -m deepspeed.launcher.launch` there).
# Environment: HOSTFILE (default infra/hostfile), CONFIG (default configs/demo.yaml),
# DS_CONFIG (optional DeepSpeed JSON), MASTER_ADDR (default: asked from the first host over ssh),
# MASTER_PORT (default 29500), NUM_NODES (default: every host in the hostfile),
# DRY_RUN=1 prints the command instead of running it.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

HOSTFILE=${HOSTFILE:-infra/hostfile}
CONFIG=${CONFIG:-configs/demo.yaml}
MASTER_PORT=${MASTER_PORT:-29500}

preflight_launch pdsh

cmd=(deepspeed --hostfile "$HOSTFILE" --launcher pdsh --master_port "$MASTER_PORT")
[[ -n ${MASTER_ADDR:-} ]] && cmd+=(--master_addr "$MASTER_ADDR")
[[ -n ${NUM_NODES:-} ]] && cmd+=(--num_nodes "$NUM_NODES")
cmd+=(launch/train.py --config "$CONFIG")
[[ -n ${DS_CONFIG:-} ]] && cmd+=(--deepspeed_config "$DS_CONFIG")
cmd+=("$@")

dry_run_exit "${cmd[@]}"
command -v pdsh >/dev/null || die "pdsh not found: install it on the launching host (Debian/Ubuntu: apt-get install pdsh)"
exec "${cmd[@]}"
