"""Weights as safetensors beside a JSON description: the one way runs store tensors.

    save_safetensors(path, tensors, metadata) -> sha256     atomic, readable by other users
    load_safetensors(path) -> (tensors, metadata)

The exported translator (what training hands to release, docs/contracts.md) is one such pair:

    EXPORT_DIR/translator.safetensors   a module's state_dict (the generator side)
    EXPORT_DIR/translator.json          {"format": 1, "model": {...}, "image_size", "domains", "step",
                                         "ema", "weights_sha256", "dis_weights_sha256"?}
    EXPORT_DIR/discriminator.safetensors  the discriminators' state_dict (optional; for init_from)

The weights are written first and the JSON last; the JSON records the weights' sha256, so a crash
between the two renames is caught when reading instead of pairing new weights with an old config.
Nothing here knows what the tensors mean: release rebuilds the network from "model".
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pipeline.atomic import replacing, write_json
from pipeline.hashing import sha256_file

WEIGHTS_NAME = "translator.safetensors"
META_NAME = "translator.json"
DIS_WEIGHTS_NAME = "discriminator.safetensors"  # optional: lets a new run start from the whole GAN
FORMAT_VERSION = 1
EXPORT_FILES = (WEIGHTS_NAME, META_NAME, DIS_WEIGHTS_NAME)


def save_safetensors(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """Write `tensors` (copied to CPU, contiguous) atomically; returns the file's sha256."""
    # Copies, not the live tensors: under DeepSpeed ZeRO the parameters are views into one flat
    # buffer, which safetensors refuses to store.
    state = {k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}
    with replacing(path) as tmp:
        save_file(state, str(tmp), metadata=metadata or {"format": "pt"})
        digest = sha256_file(tmp)
    return digest


def load_safetensors(path, device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def save_translator(dir, module: torch.nn.Module, model_config: dict, image_size: int, step: int,
                    ema: bool, domains: dict | None = None, discriminator: torch.nn.Module | None = None) -> Path:
    """Write `module`'s weights (and `discriminator`'s, when given) and their description to `dir`
    (created if needed); returns `dir`."""
    out = Path(dir)
    meta = {"format": FORMAT_VERSION, "model": model_config, "image_size": int(image_size),
            "domains": domains or {"a": "domain A", "b": "domain B"}, "step": int(step), "ema": bool(ema),
            "weights_sha256": save_safetensors(out / WEIGHTS_NAME, module.state_dict())}
    if discriminator is not None:
        meta["dis_weights_sha256"] = save_safetensors(out / DIS_WEIGHTS_NAME, discriminator.state_dict())
    write_json(out / META_NAME, meta, indent=2)
    return out


def read_meta(dir) -> dict:
    """translator.json in `dir`, checked for its format."""
    path = Path(dir) / META_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no exported translator here (missing {META_NAME})")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION or "model" not in meta:
        raise ValueError(f"{path}: expected {{'format': {FORMAT_VERSION}, 'model': {{...}}, ...}}, "
                         f"got format={meta.get('format') if isinstance(meta, dict) else meta!r}")
    return meta


def is_export_dir(path) -> bool:
    return (Path(path) / META_NAME).is_file() and (Path(path) / WEIGHTS_NAME).is_file()


def read_translator(dir, device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """(state_dict, meta) of the export in `dir`, the weights checked against the recorded sha256."""
    meta = read_meta(dir)
    weights = Path(dir) / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: missing weights file")
    want = meta.get("weights_sha256")
    if want and sha256_file(weights) != want:
        raise ValueError(f"{weights}: sha256 does not match {META_NAME} "
                         "(the export was interrupted between the two files; export again)")
    state, _ = load_safetensors(weights, device)
    return state, meta


def read_discriminator(dir, device: str = "cpu") -> dict[str, torch.Tensor] | None:
    """The discriminators' state_dict of the export in `dir`, None when it was not exported."""
    meta, path = read_meta(dir), Path(dir) / DIS_WEIGHTS_NAME
    if "dis_weights_sha256" not in meta or not path.is_file():
        return None
    if sha256_file(path) != meta["dis_weights_sha256"]:
        raise ValueError(f"{path}: sha256 does not match {META_NAME} (export again)")
    return load_safetensors(path, device)[0]
