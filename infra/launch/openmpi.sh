#!/usr/bin/env bash
# Multi-node training started by OpenMPI's mpirun through DeepSpeed's openmpi launcher.
#
#   HOSTFILE=infra/hostfile CONFIG=configs/paper.yaml bash infra/launch/openmpi.sh [key=value ...]
#
# DeepSpeed runs `mpirun -n <sum of slots> -hostfile HOSTFILE ...`: one process per slot, no
# per-node launcher. It passes neither MASTER_ADDR nor MASTER_PORT, and a rank without RANK,
# WORLD_SIZE, LOCAL_RANK and MASTER_* falls back to deepspeed.init_distributed's MPI discovery
# (mpi4py, rank 0's first `hostname -I` address, port 29500). So this recipe exports both with
# `mpirun -x` and starts each rank through mpi_rank.sh, which sets RANK, WORLD_SIZE and
# LOCAL_RANK from OpenMPI's OMPI_COMM_WORLD_* variables: discovery never runs and mpi4py is
# not needed. Needs OpenMPI (ompi_info on PATH) on every host and the same paths everywhere.
# The openmpi launcher rejects --num_nodes/--num_gpus/--include: edit the hostfile instead.
# Environment: HOSTFILE, CONFIG, DS_CONFIG, MASTER_PORT (default 29500) as in multinode.sh;
# MASTER_ADDR (default: the first host of the hostfile, where mpirun puts rank 0; set it when
# that name does not resolve on every host); TRAIN_SCRIPT (default launch/train.py);
# MPI_ARGS extra mpirun arguments (default "--mca btl_tcp_if_include eth0"; name your
# interface); DRY_RUN=1 prints the command.
# Forwarded values (MLFLOW*, PYTHON*, NCCL*, UCX*, MV2* and .deepspeed_env lines) may hold only
# letters, digits and _@%+=:,./-: DeepSpeed double-quotes any other value and mpirun -x hands
# the quotes to the ranks (see common.sh); the recipe refuses such a value before it starts.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

HOSTFILE=${HOSTFILE:-infra/hostfile}
CONFIG=${CONFIG:-configs/demo.yaml}
TRAIN_SCRIPT=${TRAIN_SCRIPT:-launch/train.py}
MASTER_PORT=${MASTER_PORT:-29500}
MPI_ARGS=${MPI_ARGS:---mca btl_tcp_if_include eth0}

preflight_launch openmpi
[[ $MASTER_PORT =~ ^[0-9]+$ ]] || die "MASTER_PORT must be an integer, got '$MASTER_PORT'"
MASTER_ADDR=${MASTER_ADDR:-$(hostfile_first_host "$HOSTFILE")}
export MASTER_ADDR MASTER_PORT
# The ranks run this python (DeepSpeed's --no_python: mpi_rank.sh execs it), by absolute path
# as DeepSpeed does, so a remote shell's PATH does not matter.
python=$(command -v python) || die "python not found on PATH (activate the virtualenv)"

cmd=(deepspeed --hostfile "$HOSTFILE" --launcher openmpi
    --launcher_args "$MPI_ARGS -x MASTER_ADDR -x MASTER_PORT"
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT"
    --no_python bash infra/launch/mpi_rank.sh "$python" -u "$TRAIN_SCRIPT" --config "$CONFIG")
[[ -n ${DS_CONFIG:-} ]] && cmd+=(--deepspeed_config "$DS_CONFIG")
cmd+=("$@")

dry_run_exit "${cmd[@]}"
command -v ompi_info >/dev/null || die "OpenMPI not found (ompi_info missing on PATH)"
exec "${cmd[@]}"
