#!/bin/sh
# Entrypoint of the MLflow server image: for each VAR_FILE that is set, export VAR with the
# file's content, then run the command. Secrets thus come from mounted files (compose or
# Kubernetes secrets) and never appear on a command line or in the compose file.
set -eu

for var in PGPASSWORD AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY \
    MLFLOW_AUTH_ADMIN_PASSWORD MLFLOW_FLASK_SERVER_SECRET_KEY; do
    file_var="${var}_FILE"
    eval "file=\${$file_var:-}"
    [ -n "$file" ] || continue
    if [ ! -r "$file" ]; then
        echo "error: $file_var=$file is not a readable file" >&2
        exit 2
    fi
    value=$(cat "$file")
    if [ -z "$value" ]; then
        echo "error: $file_var=$file is empty" >&2
        exit 2
    fi
    export "$var=$value"
    unset "$file_var"
done

exec "$@"
