#!/usr/bin/env bash
# One rank under mpirun (infra/launch/openmpi.sh): give it the variables torch.distributed's
# env:// rendezvous reads, then exec the command (python -u launch/train.py ...).
#
# With RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT all set,
# deepspeed.init_distributed skips its MPI discovery, which would replace MASTER_ADDR with rank
# 0's first `hostname -I` address and MASTER_PORT with 29500. OpenMPI (4 and 5) sets
# OMPI_COMM_WORLD_*; openmpi.sh exports MASTER_ADDR and MASTER_PORT with `mpirun -x`.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

for var in OMPI_COMM_WORLD_RANK OMPI_COMM_WORLD_SIZE OMPI_COMM_WORLD_LOCAL_RANK; do
    [[ ${!var:-} =~ ^[0-9]+$ ]] || die "$var is not set: run this through mpirun (infra/launch/openmpi.sh)"
done
[[ -n ${MASTER_ADDR:-} ]] || die "MASTER_ADDR did not reach this rank (openmpi.sh passes it with mpirun -x)"
[[ ${MASTER_PORT:-} =~ ^[0-9]+$ ]] || die "MASTER_PORT did not reach this rank or is not an integer (openmpi.sh passes it with mpirun -x)"

export RANK=$OMPI_COMM_WORLD_RANK WORLD_SIZE=$OMPI_COMM_WORLD_SIZE LOCAL_RANK=$OMPI_COMM_WORLD_LOCAL_RANK
if [[ -n ${OMPI_COMM_WORLD_LOCAL_SIZE:-} ]]; then
    export LOCAL_WORLD_SIZE=$OMPI_COMM_WORLD_LOCAL_SIZE
fi
exec "$@"
