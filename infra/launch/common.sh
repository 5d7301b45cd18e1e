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

# Fail when a forwarded variable looks like a secret, or any forwarded value is a URL that
# embeds user:password@ (MLFLOW_TRACKING_URI, MLFLOW_REGISTRY_URI, ...). Never print a value.
refuse_forwarded_secrets() {
    local name bad=() with_url=() unsafe=()
    while IFS= read -r name; do
        [[ $name =~ $UNIT_FORWARDED_PREFIXES ]] || continue
        if [[ $name =~ $UNIT_SECRET_NAMES ]]; then
            bad+=("$name")
        elif [[ ${!name} =~ ://[^/@]+@ ]]; then
            with_url+=("$name")
        elif [[ ${!name} =~ [[:space:]\;\&\|\$\`\'\"] ]]; then
            unsafe+=("$name")
        fi
    done < <(compgen -e)
    if ((${#bad[@]})); then
        die "the launcher would put ${bad[*]} on the remote command line (visible in ps and logs)." \
            "Unset it and use ~/.mlflow/credentials (mlflow_tracking_username/password, chmod 600)" \
            "or your scheduler's secret mechanism; see infra/README.md, 'Secrets'."
    fi
    if ((${#with_url[@]})); then
        die "${with_url[*]} carries credentials (user:password@host) and would be put on the remote" \
            "command line; put them in ~/.mlflow/credentials instead."
    fi
    if ((${#unsafe[@]})); then  # DeepSpeed writes `export NAME=value;` unquoted: a space cuts the value
        die "${unsafe[*]} holds a space, quote or shell character, which DeepSpeed's remote command" \
            "line (export NAME=value, unquoted) would cut or run; choose a value without them."
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

# Run the checks on the environment and on every .deepspeed_env DeepSpeed would read: it reads
# os.path.join(dir, DS_ENV_FILE) for dir in (~, .), which is DS_ENV_FILE itself when absolute.
preflight_forwarded_env() {
    refuse_forwarded_secrets
    local name=${DS_ENV_FILE:-.deepspeed_env}
    if [[ $name == /* ]]; then
        check_deepspeed_env "$name"
    else
        check_deepspeed_env "$HOME/$name"
        check_deepspeed_env "./$name"
    fi
}

# DeepSpeed takes the first word of each hostfile line as a host and hands it to ssh and pdsh
# unquoted (`ssh -oProxyCommand=... slots=8` runs a command on the launching host), so accept
# only plain host names: "<name> slots=<N>" with an optional trailing comment, plus comment and
# blank lines (what DeepSpeed's parser skips).
check_hostfile() {
    local file=$1 line n=0
    local entry='^[A-Za-z0-9_][A-Za-z0-9._-]*[[:space:]]+slots=[0-9]+([[:space:]]+#.*)?$'
    while IFS= read -r line || [[ -n $line ]]; do
        n=$((n + 1))
        line=${line#"${line%%[![:space:]]*}"}
        line=${line%"${line##*[![:space:]]}"}
        [[ -z $line || $line == '#'* || $line =~ $entry ]] && continue
        die "hostfile $file line $n is not '<host> slots=<N>' (host: letters, digits, '.', '-', '_';" \
            "not starting with '-'; a user name goes in ~/.ssh/config): $line"
    done <"$file"
}

# The first host of a hostfile (where mpirun and pdsh put rank 0).
hostfile_first_host() {
    local line
    while IFS= read -r line || [[ -n $line ]]; do
        read -r line _ <<<"$line"
        [[ -z $line || $line == '#'* ]] && continue
        echo "$line"
        return 0
    done <"$1"
    die "hostfile $1 lists no host"
}

# The checks every ssh-style launcher makes before it builds its command.
preflight_launch() {
    preflight_forwarded_env
    [[ -f $HOSTFILE ]] || die "hostfile $HOSTFILE not found (copy infra/hostfile.example and edit it)"
    check_hostfile "$HOSTFILE"
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
