#!/usr/bin/env bash
# Multi-node training started by OpenMPI's mpirun through DeepSpeed's openmpi launcher.
#
#   HOSTFILE=infra/hostfile CONFIG=configs/paper.yaml bash infra/launch/openmpi.sh [key=value ...]
#
# DeepSpeed runs `mpirun -n <sum of slots> -hostfile HOSTFILE python -u launch/train.py ...`:
# one process per slot, no per-node launcher, so each rank finds its rank and the master
# through mpi4py (deepspeed.init_distributed's MPI discovery). Needs OpenMPI (ompi_info on
# PATH) on every host, `pip install mpi4py` in the virtualenv, and the same paths everywhere.
# The openmpi launcher rejects --num_nodes/--num_gpus/--include: edit the hostfile instead.
# Environment: HOSTFILE, CONFIG, DS_CONFIG, MASTER_PORT as in multinode.sh;
# MPI_ARGS extra mpirun arguments (default "--mca btl_tcp_if_include eth0"; name your
# interface); DRY_RUN=1 prints the command.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

HOSTFILE=${HOSTFILE:-infra/hostfile}
CONFIG=${CONFIG:-configs/demo.yaml}
MASTER_PORT=${MASTER_PORT:-29500}
MPI_ARGS=${MPI_ARGS:---mca btl_tcp_if_include eth0}

preflight_launch

cmd=(deepspeed --hostfile "$HOSTFILE" --launcher openmpi --launcher_args "$MPI_ARGS"
    --master_port "$MASTER_PORT")
[[ -n ${MASTER_ADDR:-} ]] && cmd+=(--master_addr "$MASTER_ADDR")
cmd+=(launch/train.py --config "$CONFIG")
[[ -n ${DS_CONFIG:-} ]] && cmd+=(--deepspeed_config "$DS_CONFIG")
cmd+=("$@")

dry_run_exit "${cmd[@]}"
command -v ompi_info >/dev/null || die "OpenMPI not found (ompi_info missing on PATH)"
python -c "import mpi4py" 2>/dev/null || die "mpi4py is not installed in this python; run: pip install mpi4py"
exec "${cmd[@]}"
