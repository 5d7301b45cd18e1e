"""Nested settings as flat "a.b.c" keys, and as MLflow params (strings within MLflow's limit, secrets masked)."""
from __future__ import annotations

import json

from pipeline.storage import redact, redact_text

MAX_PARAM_LEN = 6000  # MLflow's limit on a param value
SECRET_WORDS = ("key", "token", "secret", "password", "credential", "auth")  # in a key name, any case
MASK = "***"


def flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}, "c": [1, 2], "e": {}} -> {"a.b": 1, "c": [1, 2], "e": {}}: values kept as they are;
    an empty dict stays a value (there is nothing below it to name)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def names_secret(key) -> bool:
    return any(w in str(key).lower() for w in SECRET_WORDS)


def mask_secrets(v, secret: bool = False):
    """`v` with every value below a key that names a secret (anywhere above it in the nesting, lists
    included) replaced by MASK; the keys stay, so a param still says the setting was given. A
    DeepSpeed JSON's monitor sections (comet api_key, wandb) are logged as params otherwise."""
    if isinstance(v, dict):
        return {k: mask_secrets(x, secret or names_secret(k)) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [mask_secrets(x, secret) for x in v]
    return MASK if secret else v


def without_pipe_args(v):
    """`v` with every "pipe:" command string in it (lists included) cut to its program name
    (storage.redact): a shard spec's command carries its own credentials (curl -u user:pass,
    a header with a token) that no URL pattern finds."""
    if isinstance(v, str):
        return redact(v) if v.startswith("pipe:") else v
    if isinstance(v, (list, tuple)):
        return [without_pipe_args(x) for x in v]
    return v


def param_value(v) -> str:
    """A value as an MLflow param: strings as they are, anything else as JSON; cut to MAX_PARAM_LEN.
    URLs in it lose what may hold a credential (user:password@, a signed URL's query), a pipe:
    command its arguments: a config's tracking.uri or shard specs are logged as params."""
    v = without_pipe_args(v)
    s = redact_text(v if isinstance(v, str) else json.dumps(v, default=str))
    return s if len(s) <= MAX_PARAM_LEN else s[:MAX_PARAM_LEN - 3] + "..."


def as_params(d: dict) -> dict[str, str]:
    """flatten(d) with secrets masked (mask_secrets) and every value as param_value."""
    return {k: param_value(v) for k, v in flatten(mask_secrets(d)).items()}
