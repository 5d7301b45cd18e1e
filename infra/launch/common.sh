# shellcheck shell=bash
# Shared checks for the launch recipes in this folder; sourced, never run.
#
# DeepSpeed's ssh-based launchers (pdsh, openmpi, mvapich, slurm) copy every variable whose
# name starts with MLFLOW, PYTHON, MV2, UCX or NCCL, plus each line of .deepspeed_env, into
# the remote command line (`export K=V; ...`, `mpirun -x K=V`, `srun --export=ALL,K=V`).
# Anything secret there ends up in `ps`, shell history and job logs, so these recipes refuse
# to start when one is present.
#
# DeepSpeed (0.19, launcher/multinode_runner.py add_export) leaves a value bare when every
# character is in [\w@%+=:,./-] and wraps any other value in double quotes. pdsh hands the
# exports to the remote shell, which removes those quotes (and expands $, ` and \ inside them);
# mpirun -x (openmpi) and the others run no shell, so the quotes reach the ranks as part of the
# value: NCCL_SOCKET_IFNAME='^docker0,lo' arrives as "^docker0,lo", quotes included.

# Prefixes DeepSpeed forwards (deepspeed/launcher/runner.py EXPORT_ENVS plus the CUDA
# accelerator's NCCL).
UNIT_FORWARDED_PREFIXES='^(MLFLOW|PYTHON|MV2|UCX|NCCL)'
# Names that look like credentials.
UNIT_SECRET_NAMES='(PASSWORD|TOKEN|SECRET|CREDENTIAL|PRIVATE|_KEY$|APIKEY)'
# A value DeepSpeed leaves unquoted (its [\w@%+=:,./-]; [:alnum:] is ASCII in the C locale and
# at most \w in others). The only values the openmpi launcher delivers unchanged.
UNIT_DS_BARE_VALUE='^[[:alnum:]_@%+=:,./-]*$'
# What the pdsh remote shell would not keep literal inside DeepSpeed's double quotes (whitespace
# too: DeepSpeed strips it at both ends, and the recipes keep values to one word).
UNIT_PDSH_UNSAFE="[[:space:][:cntrl:]\"'\$\`\\\\]"

die() {
    echo "error: $*" >&2
    exit 2
}

# forwarded_value_ok LAUNCHER VALUE: whether DeepSpeed's LAUNCHER (pdsh, or openmpi and any
# other, which run no shell) delivers VALUE to the ranks as it is.
forwarded_value_ok() {
    [[ $2 =~ $UNIT_DS_BARE_VALUE ]] && return 0
    [[ $1 == pdsh && ! $2 =~ $UNIT_PDSH_UNSAFE ]]
}

# The rule forwarded_value_ok applies, in words, for error messages.
forwarded_value_rule() {
    if [[ $1 == pdsh ]]; then
        echo "DeepSpeed double-quotes a value with a character outside letters, digits and _@%+=:,./-" \
            "and pdsh's remote shell reads it, so the value must hold no whitespace, control" \
            "character, quote, \$, backtick or backslash"
    else
        echo "DeepSpeed double-quotes a value with a character outside letters, digits and _@%+=:,./-" \
            "and the $1 launcher runs no shell to remove the quotes (they reach the ranks as part of" \
            "the value), so use only those characters (other values work through" \
            "launch/multinode.sh, which uses pdsh, or launch/node.sh)"
    fi
}

# Fail when a forwarded variable looks like a secret, any forwarded value is a URL that embeds
# user:password@ (MLFLOW_TRACKING_URI, MLFLOW_REGISTRY_URI, ...), or a value would not reach the
# ranks unchanged through LAUNCHER (default: the no-shell rule). Never print a value.
refuse_forwarded_secrets() {
    local launcher=${1:-openmpi} name bad=() with_url=() unsafe=() excluded=''
    # runner.py EXCLUDE_ENVS: with AISC_JOB_NAME set these two are not forwarded.
    [[ -n ${AISC_JOB_NAME+x} ]] && excluded='^(NCCL_IB_HCA|UCX_NET_DEVICES)$'
    while IFS= read -r name; do
        [[ $name =~ $UNIT_FORWARDED_PREFIXES ]] || continue
        [[ -n $excluded && $name =~ $excluded ]] && continue
        if [[ $name =~ $UNIT_SECRET_NAMES ]]; then
            bad+=("$name")
        elif [[ ${!name} =~ ://[^/@]+@ ]]; then
            with_url+=("$name")
        elif ! forwarded_value_ok "$launcher" "${!name}"; then
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
    if ((${#unsafe[@]})); then
        die "${unsafe[*]} would not reach the ranks unchanged: $(forwarded_value_rule "$launcher")."
    fi
    # DeepSpeed also exports PYTHONPATH=<its working directory>[:$PYTHONPATH], and pdsh runs
    # `cd <that directory>;` unquoted on every host.
    local cwd
    cwd=$(pwd -P)
    [[ $cwd =~ $UNIT_DS_BARE_VALUE ]] \
        || die "the working directory $cwd has a character outside letters, digits and _@%+=:,./-;" \
            "DeepSpeed puts it on the remote command line (PYTHONPATH, and pdsh's cd) where it" \
            "would be cut or quoted into the value. Run from a checkout at a plain path."
}

# check_deepspeed_env FILE [LAUNCHER]: DeepSpeed splits every line at the first '=' with no
# support for comments or blank lines (either crashes the launcher), and exports each value on
# the remote command line like a forwarded variable, so the same value rule applies (default:
# the no-shell rule of openmpi). Never print a value.
check_deepspeed_env() {
    local file=$1 launcher=${2:-openmpi} line n=0
    [[ -f $file ]] || return 0
    while IFS= read -r line || [[ -n $line ]]; do
        n=$((n + 1))
        if [[ ! $line =~ ^[A-Za-z_][A-Za-z0-9_]*=[^[:space:]]*$ ]]; then
            die "$file line $n is not KEY=VALUE (no comments, blank lines or spaces: DeepSpeed cannot parse them)"
        fi
        if [[ ${line%%=*} =~ $UNIT_SECRET_NAMES || $line =~ ://[^/@]+@ ]]; then
            die "$file line $n: ${line%%=*} looks like a secret; .deepspeed_env values are exported on the remote command line"
        fi
        if ! forwarded_value_ok "$launcher" "${line#*=}"; then
            die "$file line $n: the value of ${line%%=*} would not reach the ranks unchanged:" \
                "$(forwarded_value_rule "$launcher")."
        fi
    done <"$file"
}

# preflight_forwarded_env [LAUNCHER]: run the checks on the environment and on every
# .deepspeed_env DeepSpeed would read: it reads os.path.join(dir, DS_ENV_FILE) for dir in
# (~, .), which is DS_ENV_FILE itself when absolute.
preflight_forwarded_env() {
    local launcher=${1:-openmpi}
    refuse_forwarded_secrets "$launcher"
    local name=${DS_ENV_FILE:-.deepspeed_env}
    if [[ $name == /* ]]; then
        check_deepspeed_env "$name" "$launcher"
    else
        check_deepspeed_env "$HOME/$name" "$launcher"
        check_deepspeed_env "./$name" "$launcher"
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

# preflight_launch LAUNCHER: the checks every ssh-style launcher (pdsh, openmpi) makes before
# it builds its command.
preflight_launch() {
    preflight_forwarded_env "${1:-openmpi}"
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
