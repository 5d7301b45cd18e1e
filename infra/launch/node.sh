#!/usr/bin/env bash
# One DeepSpeed launcher per node, no ssh: each node runs this script itself and
# DeepSpeed's per-node launcher starts GPUS_PER_NODE local ranks. SLURM (srun, one task per
# node) and Kubernetes (one pod per node of an indexed Job) use it; so can any scheduler.
#
#   NNODES=2 GPUS_PER_NODE=8 NODE_RANK=0 MASTER_ADDR=node-a bash infra/launch/node.sh [key=value ...]
#
# Environment:
#   NNODES, GPUS_PER_NODE   the world shape (every node must use the same values)
#   NODE_RANK               this node, 0..NNODES-1 (default: SLURM_NODEID, then JOB_COMPLETION_INDEX)
#   MASTER_ADDR             address of node 0, reachable from every node
#   MASTER_PORT             rendezvous port on node 0 (default 29500)
#   NODE_NAMES              optional space-separated node names, in rank order (labels only)
#   CONFIG                  experiment YAML (default configs/demo.yaml); DS_CONFIG optional JSON
#   TRAIN_SCRIPT            default launch/train.py
#   MASTER_WAIT_S           how long to wait for MASTER_ADDR to resolve (default 300)
#   DRY_RUN=1               print the hostfile and the command instead of running them
#
# DeepSpeed still wants a hostfile with --no_ssh: it only uses it to know how many nodes and
# slots there are and which place NODE_RANK holds, so the names are labels and never contacted.
# Environment variables reach the ranks by inheritance here; nothing is put on a command line.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-${JOB_COMPLETION_INDEX:-}}}
MASTER_PORT=${MASTER_PORT:-29500}
CONFIG=${CONFIG:-configs/demo.yaml}
TRAIN_SCRIPT=${TRAIN_SCRIPT:-launch/train.py}
MASTER_WAIT_S=${MASTER_WAIT_S:-300}

is_int() { [[ $1 =~ ^[0-9]+$ ]]; }
if ! is_int "${NNODES:-}" || ((NNODES < 1)); then
    die "NNODES must be a positive integer, got '${NNODES:-}'"
fi
if ! is_int "${GPUS_PER_NODE:-}" || ((GPUS_PER_NODE < 1)); then
    die "GPUS_PER_NODE must be a positive integer, got '${GPUS_PER_NODE:-}'"
fi
if ! is_int "$NODE_RANK" || ((NODE_RANK >= NNODES)); then
    die "NODE_RANK must be an integer in [0, $NNODES), got '$NODE_RANK' (set NODE_RANK, SLURM_NODEID or JOB_COMPLETION_INDEX)"
fi
[[ -n ${MASTER_ADDR:-} ]] || die "MASTER_ADDR is not set (the address of node 0)"
is_int "$MASTER_PORT" || die "MASTER_PORT must be an integer, got '$MASTER_PORT'"
# Checked before any arithmetic: bash evaluates a variable's value there as an expression.
is_int "$MASTER_WAIT_S" || die "MASTER_WAIT_S must be a whole number of seconds, got '$MASTER_WAIT_S'"

read -r -a names <<<"${NODE_NAMES:-}"
if ((${#names[@]} == 0)); then
    for ((i = 0; i < NNODES; i++)); do names+=("node-$i"); done
fi
((${#names[@]} == NNODES)) || die "NODE_NAMES has ${#names[@]} names but NNODES=$NNODES"

hostfile=$(mktemp "${TMPDIR:-/tmp}/unit-hostfile.XXXXXX")
for name in ${names[@]+"${names[@]}"}; do
    echo "$name slots=$GPUS_PER_NODE"
done >"$hostfile"

cmd=(deepspeed --no_ssh --node_rank "$NODE_RANK" --hostfile "$hostfile"
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT"
    "$TRAIN_SCRIPT" --config "$CONFIG")
[[ -n ${DS_CONFIG:-} ]] && cmd+=(--deepspeed_config "$DS_CONFIG")
cmd+=("$@")

if [[ ${DRY_RUN:-0} == 1 ]]; then
    cat "$hostfile"
    rm -f "$hostfile"
    printf '%q ' "${cmd[@]}"
    echo
    exit 0
fi

# Nodes start at different times; under Kubernetes node 0's DNS name appears only once its
# pod runs. Wait for the name, bounded, rather than fail the whole job on a race. (`ahosts`, not
# `hosts`: it also accepts a raw IP address that no hosts file lists.)
if command -v getent >/dev/null && ((NODE_RANK != 0)); then
    deadline=$((SECONDS + MASTER_WAIT_S))
    until getent ahosts "$MASTER_ADDR" >/dev/null; do
        ((SECONDS < deadline)) || die "MASTER_ADDR $MASTER_ADDR did not resolve within ${MASTER_WAIT_S}s"
        sleep 2
    done
fi
echo "node $NODE_RANK/$NNODES: $GPUS_PER_NODE ranks, master $MASTER_ADDR:$MASTER_PORT, config $CONFIG" >&2
# exec so that the scheduler's SIGTERM reaches the launcher, which stops its ranks.
exec "${cmd[@]}"
