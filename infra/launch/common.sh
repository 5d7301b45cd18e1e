# shellcheck shell=bash
# Shared checks for the launch recipes in this folder; sourced, never run.
#
# DeepSpeed's ssh-based launchers (pdsh, openmpi, mvapich, slurm) copy every variable whose
# name starts with MLFLOW, PYTHON, MV2, UCX or NCCL, plus each line of .deepspeed_env, into
# the remote command line as unquoted exports (`export K=V; ...`, `mpirun -x K=V`,
# `srun --export=ALL,K=V`). Anything secret there ends up in `ps`, shell history and job
# logs, so these recipes refuse to start when one is present.

# Prefixes DeepSpeed forwards (deepspeed/launcher/runner.py EXPORT_ENVS plus the CUDA
# accelerator's NCCL).
UNIT_FORWARDED_PREFIXES='^(MLFLOW|PYTHON|MV2|UCX|NCCL)'
# Names that look like credentials.
UNIT_SECRET_NAMES='(PASSWORD|TOKEN|SECRET|CREDENTIAL|PRIVATE|_KEY$|APIKEY)'

die() {
    echo "error: $*" >&2
    exit 2
}

# Fail when a forwarded variable looks like a secret, or a tracking URI embeds user:password.
refuse_forwarded_secrets() {
    local name bad=()
    while IFS= read -r name; do
        if [[ $name =~ $UNIT_FORWARDED_PREFIXES && $name =~ $UNIT_SECRET_NAMES ]]; then
            bad+=("$name")
        fi
    done < <(compgen -e)
    if ((${#bad[@]})); then
        die "the launcher would put ${bad[*]} on the remote command line (visible in ps and logs)." \
            "Unset it and use ~/.mlflow/credentials (mlflow_tracking_username/password, chmod 600)" \
            "or your scheduler's secret mechanism; see infra/README.md, 'Secrets'."
    fi
    if [[ ${MLFLOW_TRACKING_URI:-} =~ ://[^/@]+@ ]]; then
        die "MLFLOW_TRACKING_URI carries credentials (user:password@host); put them in ~/.mlflow/credentials instead."
    fi
}

# Check a .deepspeed_env file: DeepSpeed splits every line at the first '=' with no support
# for comments or blank lines (either crashes the launcher), and exports it unquoted.
check_deepspeed_env() {
    local file=$1 line n=0
    [[ -f $file ]] || return 0
    while IFS= read -r line || [[ -n $line ]]; do
        n=$((n + 1))
        if [[ ! $line =~ ^[A-Za-z_][A-Za-z0-9_]*=[^[:space:]]*$ ]]; then
            die "$file line $n: '$line' is not KEY=VALUE (no comments, blank lines or spaces: DeepSpeed cannot parse them)"
        fi
        if [[ ${line%%=*} =~ $UNIT_SECRET_NAMES || $line =~ ://[^/@]+@ ]]; then
            die "$file line $n: ${line%%=*} looks like a secret; .deepspeed_env values are exported on the remote command line"
        fi
    done <"$file"
}

# Run the checks on the environment and on every .deepspeed_env DeepSpeed would read.
preflight_forwarded_env() {
    refuse_forwarded_secrets
    local name=${DS_ENV_FILE:-.deepspeed_env}
    check_deepspeed_env "$HOME/$name"
    check_deepspeed_env "./$name"
}

# The checks every ssh-style launcher makes before it builds its command.
preflight_launch() {
    preflight_forwarded_env
    [[ -f $HOSTFILE ]] || die "hostfile $HOSTFILE not found (copy infra/hostfile.example and edit it)"
    [[ -f $CONFIG ]] || die "config $CONFIG not found (run from the repository root)"
}

# DRY_RUN=1: print the command, quoted, and stop; otherwise return and let the caller exec it.
dry_run_exit() {
    if [[ ${DRY_RUN:-0} == 1 ]]; then
        printf '%q ' "$@"
        echo
        exit 0
    fi
}
