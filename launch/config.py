"""The one training config: YAML + `key=value` overrides, validated by pydantic before any rank starts.

`python -m launch.config CONFIG [key=value ...]` validates and prints the resolved config;
`make train` runs it before starting the DeepSpeed launcher, and every rank validates again
before it touches torch.distributed, so a bad value never leaves ranks waiting for each other.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from launch.runstore.params import flatten
from model.unit import PRESETS, UNITConfig, dis_scales_for, make_config
from pipeline.augment import AugmentConfig
from pipeline.hashing import sha256_json
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator


class ConfigError(ValueError):
    """A bad config: the message names the key, the value and what is allowed."""


class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading 1e-3 (no decimal point) and 1.0e5 (no exponent sign) as numbers.
    PyYAML follows YAML 1.1, where both are strings: model.w_kl=1e-2 was refused as "not a number"
    and data.augment.color_jitter=1e-1 reached the loader workers as the string '1e-1'."""


YamlLoader.add_implicit_resolver(  # tried after the stock float and int patterns, which do not match these
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def load_yaml(text: str):
    """A config file's or an override's YAML text, with YamlLoader (safe: no Python objects)."""
    return yaml.load(text, Loader=YamlLoader)  # noqa: S506 - a SafeLoader subclass


def _kinds(annotation) -> set:
    """The plain types an annotation admits: Optional[int] -> {int, NoneType}."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return set().union(*(_kinds(a) for a in typing.get_args(annotation)))
    return {annotation}


def _bounds(metadata) -> str:
    """' >= 1 and < 1.0' from a field's Ge/Gt/Le/Lt constraints."""
    ops = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
    parts = [f"{sym} {getattr(m, name)}" for m in metadata for name, sym in ops if hasattr(m, name)]
    return (" " + " and ".join(parts)) if parts else ""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_number_mixups(cls, v, info: ValidationInfo):
        # pydantic's lax mode reads `true` as 1 for an int (train.max_steps=true trains 1 step) and
        # 1 / "yes" as True for a bool; a YAML value of the wrong kind is a mistake, say so.
        field = cls.model_fields[info.field_name]
        kinds = _kinds(field.annotation)
        numbers = kinds & {int, float}
        if isinstance(v, bool) and numbers and bool not in kinds:
            what = "an integer" if int in numbers else "a number"
            raise ValueError(f"must be {what}{_bounds(field.metadata)}, not true/false")
        if bool in kinds and v is not None and not isinstance(v, bool):
            raise ValueError("must be true or false")
        return v


class DataSection(_Strict):
    shards: Optional[str] = Field(None, description="OUT folder of `make shards`, a path or URL (s3://, gs://, "
                                  "http(s)://; uses its index.json's a and b shards), or the index.json itself")
    shards_a: Optional[str] = Field(None, description="domain A shards: an OUT folder or index.json (path or URL), a "
                                    "shard URL ending .tar or a brace pattern of them (overrides `shards`)")
    shards_b: Optional[str] = Field(None, description="domain B shards, as shards_a")
    image_size: int = Field(64, ge=16, le=1024, description="training crop size in pixels (multiple of 4 times 2**n_down)")
    batch_size: int = Field(8, ge=1, description="micro-batch per rank and per domain")
    num_workers: int = Field(2, ge=0, le=64, description="loader worker processes per rank")
    augment: AugmentConfig = Field(default_factory=AugmentConfig,
                                   description="pipeline.augment.AugmentConfig: resize, train, flip, color_jitter, "
                                               "jitter_p, interpolation")

    @field_validator("augment", mode="before")
    @classmethod
    def _augment(cls, v):
        if isinstance(v, dict):
            check_kinds("data.augment", AugmentConfig, v)
        elif v is not None and not isinstance(v, AugmentConfig):  # from_any's TypeError would escape pydantic
            raise ValueError("must be a mapping of augment settings ({resize: 72, flip: true, color_jitter: 0.1, "
                             "...}) or null")
        return AugmentConfig.from_any(v)
    verify_shards: bool = Field(False, description="check each shard's sha256 against index.json when it is read: "
                                "local files and cached copies once, remote bytes each time they are fetched; a "
                                "mismatch skips the shard (loader/skipped/checksum_mismatch)")
    cache_dir: Optional[str] = Field(None, description="local folder caching remote shards (shared by the workers and "
                                     "ranks of a machine); unset: fetched into memory each time one is drawn")
    cache_bytes: int = Field(20 * 2**30, ge=1, description="size bound of cache_dir in bytes: least recently used "
                             "shards are removed; a shard larger than this is never cached")
    test_a: Optional[str] = Field(None, description="paired test split, domain A images (for evaluation)")
    test_b: Optional[str] = Field(None, description="paired test split, domain B images, same stems as test_a")

    def scale(self) -> int:
        """The side the training images are resized to before the crop (augment.resize, else the crop
        size): the scale the translator learns. Evaluation, the baselines, the palette, the sample
        grids and the export use it, so a run on 32 px crops of images resized to 64 (image_size 32,
        augment.resize 64) is scored on whole 64 px test images."""
        return self.augment.resize or self.image_size

    def test_split(self) -> dict:
        """The paired test split as evaluation and registration take it (empty when not set):
        domain A inputs are domain B's truth's pairs and the other way round."""
        if not (self.test_a and self.test_b):
            return {}
        return {"test_a": self.test_a, "truth_b": self.test_b, "test_b": self.test_b, "truth_a": self.test_a}

    def sources(self) -> tuple[str, str]:
        """(domain A, domain B) shard specs: each domain's own where set, else the OUT folder."""
        return (self.shards_a if self.shards_a is not None else self.shards,
                self.shards_b if self.shards_b is not None else self.shards)

    @model_validator(mode="after")
    def _sources(self):
        if self.shards is None and (self.shards_a is None or self.shards_b is None):
            raise ValueError("set data.shards (an OUT directory of make shards) or both data.shards_a and data.shards_b")
        if (self.test_a is None) != (self.test_b is None):
            # half a split would mean no end-of-run evaluation, grids from training images and a gate
            # that says "no paired test split" only after the whole run
            given, missing = ("test_a", "test_b") if self.test_b is None else ("test_b", "test_a")
            raise ValueError(f"data.{given} = {getattr(self, given)!r} without data.{missing}: the paired test split "
                             f"needs both folders (same file stems in each), or neither")
        return self


class OptimSection(_Strict):
    lr_g: float = Field(1e-4, gt=0, description="generator-side learning rate")
    lr_d: float = Field(1e-4, gt=0, description="discriminator learning rate")
    betas: tuple[float, float] = Field((0.5, 0.999), description="Adam betas")

    @field_validator("betas", mode="before")
    @classmethod
    def _betas_numbers(cls, v):
        if isinstance(v, (list, tuple)) and any(isinstance(b, bool) for b in v):
            raise ValueError("each beta must be a number in [0, 1), not true/false")
        return v
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    adam_w_mode: bool = Field(False, description="False: Adam with L2 weight decay (the paper's); True: AdamW")
    grad_clip: Optional[float] = Field(None, ge=0, description="global gradient-norm clip; None: the DeepSpeed "
                                       "JSON's gradient_clipping, else 0 (off, as in the paper)")
    schedule: Literal["constant", "warmup", "warmup_decay"] = Field("constant", description="LR schedule of both engines")
    warmup_steps: int = Field(0, ge=0)

    @field_validator("betas")
    @classmethod
    def _betas(cls, v):
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError("each beta must be in [0, 1)")
        return v

    @model_validator(mode="after")
    def _warmup(self):
        # the constant schedule has no warmup: the steps would be ignored without a word
        if self.warmup_steps and self.schedule == "constant":
            raise ValueError(f"optim.warmup_steps = {self.warmup_steps}: optim.schedule is 'constant', which has no "
                             "warmup; set optim.schedule to warmup or warmup_decay, or leave warmup_steps out")
        return self


class TrainSection(_Strict):
    max_steps: int = Field(1000, ge=1, description="optimizer steps to train for")
    log_every: int = Field(10, ge=1, description="steps between metric lines")
    sample_every: int = Field(200, ge=1, description="steps between sample grids")
    ckpt_every: int = Field(200, ge=1, description="steps between checkpoints (one is always written at the end)")
    keep_ckpts: int = Field(3, ge=1, description="complete checkpoints kept")
    max_nonfinite: int = Field(5, ge=1, description="consecutive NaN/inf steps that stop the run (with "
                                                     "grad_accum_steps > 1 the first one stops it)")
    stall_timeout_s: float = Field(600.0, ge=0, description="a rank whose loop finished no step for this long "
                                                             "exits (a peer vanished); 0 disables it")
    ema_decay: float = Field(0.0, ge=0.0, lt=1.0, description="EMA of the generator side, 0 disables it")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on GPUs that have it natively, fp16 on other GPUs, fp32 on CPU. bf16: fp32 "
                            "weights, networks under torch.autocast, loss reductions in fp32 (CPU too). fp16 (GPU "
                            "only): DeepSpeed fp16 with dynamic loss scaling in both engines; overflowed steps are "
                            "skipped and counted (skipped_steps_g/d metrics)")
    compile: bool = Field(False, description="torch.compile the generator and the discriminators (the first "
                                             "steps compile; state_dict names and checkpoints are unchanged)")
    zero_stage: int = Field(0, ge=0, le=2, description="DeepSpeed ZeRO stage of both engines (0-2: exact for "
                                                         "the two-engine GAN step); a DeepSpeed JSON may set it instead")
    grad_accum_steps: int = Field(1, ge=1, description="micro-batches per optimizer step; a DeepSpeed JSON may "
                                                         "set it instead")
    threads: int = Field(0, ge=0, description="torch threads per rank (0: leave torch's default)")
    sample_count: int = Field(4, ge=1, le=16, description="held-out images per domain in the sample grid")

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, v):
        if isinstance(v, dict) and "realism" in v:
            raise ValueError("train.realism was replaced by the eval section (eval.c2st_steps: 0 turns the "
                             "two-sample test off)")
        return v


class EvalSection(_Strict):
    """The end-of-training evaluation on the paired test split (data.test_a / data.test_b)."""

    c2st_steps: int = Field(200, ge=0, description="classifier steps of the two-sample test per translator "
                                                   "and direction (0: off)")
    fid_features: Optional[str] = Field(None, description="TorchScript feature extractor file for FID/KID "
                                                          "(uint8 NCHW -> [N, D]); unset: not computed")
    baseline_images: int = Field(1000, ge=1, description="at most this many training images per domain, each once, "
                                 "spread evenly over the shards, that the baselines (best constant colour, "
                                 "histograms) and palette: auto are estimated from")


class TrackingSection(_Strict):
    enable: bool = True
    uri: Optional[str] = Field(None, description="MLflow tracking URI; None: MLFLOW_TRACKING_URI or an embedded store in run_dir/mlflow")
    experiment: str = "unit"
    run_name: Optional[str] = None
    system_metrics: bool = True


class RegistrySection(_Strict):
    enable: bool = Field(True, description="register the translator at the end of training")
    name: str = Field("unit-translator", description="registered model name")
    min_accuracy: float = Field(0.0, ge=0.0, le=1.0, description="gate for the champion alias (a2b pixel accuracy)")


class Config(_Strict):
    run_dir: str = Field("runs/default", description="checkpoints, samples, metrics, export")
    seed: int = Field(0, ge=0, description="seeds every random stream with (seed, rank, worker, step); numpy's "
                      "generators take no negative seed")
    resume: str = Field("auto", description="auto | never | path to a checkpoint directory")
    trust_resume_path: bool = Field(False, description="load `resume` from outside run_dir: DeepSpeed "
                                    "checkpoints are pickles, so only for checkpoints you trust")
    deepspeed_config: Optional[str] = Field(None, description="DeepSpeed JSON (the --deepspeed_config flag wins)")
    init_from: Optional[str] = Field(None, description="start (step 0) from a trained translator: models:/<name>@<alias>, "
                                     "models:/<name>/<version> (in tracking.uri's registry) or an export dir; "
                                     "the generator, and the discriminators when they were exported")
    data: DataSection
    model: UNITConfig = Field(default_factory=lambda: make_config({"preset": "paper"}),
                              description="model.unit.UNITConfig: {preset: paper|official|tiny, field: value, ...}")
    optim: OptimSection = Field(default_factory=OptimSection)
    train: TrainSection = Field(default_factory=TrainSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)
    registry: RegistrySection = Field(default_factory=RegistrySection)

    @field_validator("resume")
    @classmethod
    def _resume(cls, v):
        if not v.strip():  # what it points at is checked before launch (resume_point)
            raise ValueError("must be 'auto', 'never' or a checkpoint directory")
        return v

    @field_validator("model", mode="before")
    @classmethod
    def _model(cls, v):
        if not isinstance(v, UNITConfig):
            if not isinstance(v, dict):
                raise ValueError("must be a mapping of model settings (preset: paper, dim: 32, ...)")
            check_model_config(v)
            v = make_config(v)
        if v.channels != 3:  # the loader decodes every image to RGB (pipeline/augment.py)
            raise ValueError(f"model.channels = {v.channels}: the data loader yields RGB images; only 3 is supported")
        return v

    @model_validator(mode="after")
    def _warmup_within_run(self):
        # a warmup that ends at or after the last step never reaches optim.lr_g / lr_d
        warmup, steps = self.optim.warmup_steps, self.train.max_steps
        if self.optim.schedule != "constant" and warmup >= steps:
            raise ValueError(f"optim.warmup_steps = {warmup} with train.max_steps = {steps}: the warmup must end "
                             f"before the run does, or the learning rate never reaches optim.lr_g / lr_d; lower "
                             f"optim.warmup_steps below {steps} or raise train.max_steps")
        return self

    @model_validator(mode="after")
    def _sizes(self):
        """The crop size is data.image_size; the model's discriminators follow it (model.image_size)."""
        size, n_down = self.data.image_size, self.model.n_down
        if self.model.image_size not in (0, size):
            raise ValueError(f"model.image_size = {self.model.image_size}: the model follows data.image_size "
                             f"({size}); set data.image_size and leave model.image_size out")
        if size % (2 ** n_down * 4):
            raise ValueError(f"data.image_size = {size}: must be a multiple of {2 ** n_down * 4} "
                             "(4 times 2**model.n_down)")
        resize = self.data.augment.resize
        if resize is not None and resize < size:
            raise ValueError(f"data.augment.resize = {resize}: must be >= data.image_size ({size})")
        if resize is not None:
            check_scale(resize, size, n_down)
        if self.model.hue_pool > size:
            raise ValueError(f"model.hue_pool = {self.model.hue_pool}: the hue prior's blocks must fit in one "
                             f"data.image_size ({size}) crop")
        self.model.image_size = size  # a dataclass field: set without re-running the validators
        try:  # the model's own check, which UNIT() would otherwise raise on every rank
            dis_scales_for(self.model, size)
        except ValueError as e:
            raise ValueError(f"data.image_size = {size}: {str(e).removeprefix('UNIT config: ')} (model section); "
                             "lower model.dis_layers or model.dis_min_size, or raise data.image_size") from None
        return self


def check_scale(resize: int, size: int, n_down: int) -> None:
    """data.scale() (here augment.resize) is the side that evaluation, the sample grids and the export
    feed the generator whole: it must be a multiple of the generator's input multiple, 2**n_down
    (UNITGenerator.input_multiple), or the generator paints a smaller image than it is given and the
    export's image_size is refused by the ONNX export."""
    m = 2 ** n_down
    if resize % m == 0:
        return
    lower = resize // m * m  # >= image_size, itself a multiple of 4 * m
    raise ValueError(f"data.augment.resize = {resize}: the scale evaluation, sample grids and the export use "
                     f"(data.scale()) must be a multiple of {m} (2**model.n_down = 2**{n_down}, the generator's "
                     f"input multiple) and >= data.image_size ({size}); nearest valid: {lower} or {lower + m}")


def check_kinds(section: str, cls, values: dict) -> None:
    """YAML values of the wrong kind for a dataclass section: true for a number, 1 for a flag."""
    types_ = {f.name: f.type for f in dataclasses.fields(cls)}
    for key, value in values.items():
        # "int | None" under `from __future__ import annotations`
        kinds = {k.strip() for k in str(getattr(types_.get(key), "__name__", types_.get(key))).split("|")}
        numbers = kinds & {"int", "float"}
        if numbers and "bool" not in kinds and isinstance(value, bool):
            raise ValueError(f"{section}.{key} = {value!r}: must be "
                             f"{'an integer' if 'int' in numbers else 'a number'}, not true/false")
        if kinds == {"bool"} and not isinstance(value, bool):
            raise ValueError(f"{section}.{key} = {value!r}: must be true or false")


def check_model_config(model: dict) -> None:
    """Validate the model section's keys and kinds; UNITConfig checks the values when it is built."""
    preset = model.get("preset", "paper")
    if preset not in PRESETS:
        raise ValueError(f"model.preset={preset!r} is not one of {sorted(PRESETS)}")
    allowed = {f.name for f in dataclasses.fields(UNITConfig)} | {"preset"}
    if "ema_decay" in model:
        raise ValueError("model.ema_decay: set train.ema_decay instead (the trainer owns the EMA)")
    for key in model:
        if key not in allowed:
            raise ValueError(f"model.{key} is not a model setting; allowed: {sorted(allowed)}")
    check_kinds("model", UNITConfig, model)


# ---------------------------------------------------------------- loading

# Tokens that stand for no text of their own: a BlockEnd closing a mapping (`data=shards: x #2`)
# or the StreamEnd is placed where the scanner stopped, after a trailing comment, so counting
# them would hide the comment.
_MARKER_TOKENS = (yaml.StreamStartToken, yaml.StreamEndToken, yaml.BlockEndToken)


def yaml_comment(raw: str) -> str:
    """The first text of `raw` that YAML skips as a comment ('' when none): whatever lies outside
    the scanner's tokens but is not whitespace (between tokens, YAML skips only blanks and
    comments). Raises yaml.YAMLError as the scanner does."""
    end = 0
    for token in yaml.scan(raw, Loader=YamlLoader):
        if isinstance(token, _MARKER_TOKENS):
            continue
        gap = raw[end:token.start_mark.index].strip()
        if gap:
            return gap.splitlines()[0].strip()
        end = max(end, token.end_mark.index)
    rest = raw[end:].strip()
    return rest.splitlines()[0].strip() if rest else ""


def parse_override(text: str) -> tuple[list[str], Any]:
    """`key.path=value`, the value read as YAML (5 is a number, [0.5, 0.9] a list, an empty value null).
    A value YAML cannot read, or one with a YAML comment (` #...`, which YAML would drop without a
    word: run_dir=runs/exp #2 would train into runs/exp), is refused, naming the override and how to
    quote it as a string."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key=value")
    key, raw = text.split("=", 1)
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    if raw == "":
        return key.split("."), None
    quote = f"quote the value to pass it as a string: {key}='{json.dumps(raw)}'"  # JSON strings are YAML
    try:
        dropped = yaml_comment(raw)
        value = load_yaml(raw)
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({problem}); {quote}") from None
    if dropped:
        if isinstance(value, (dict, list)):  # the whole value as one string is not what was meant
            quote = ("quote the text that holds the '#' inside the value, as in a YAML file: "
                     f"""{key}='name: "a #2"'""")
        raise ConfigError(f"override {text!r}: YAML reads {dropped!r} as a comment and would drop it (the value "
                          f"would be {value!r}); {quote}")
    return key.split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    out = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            if node.get(part) is None:  # a section whose keys are all commented out reads as null
                node[part] = {}
            child = node[part]
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return out


def _explain(err: ValidationError, flags: dict | None = None) -> str:
    """One line per problem, naming the config key, or the command-line flag that set it (`flags`)."""
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        value = e.get("input")
        shown = "" if isinstance(value, dict) else f" = {value!r}"
        msg = e["msg"].replace("Value error, ", "")
        if not key or msg.startswith(key):  # the message names the key (a check across sections)
            lines.append(f"config key {msg}")
            continue
        if key in (flags or {}):
            lines.append(f"--{key} {value!r}: {msg}")
            continue
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "string_type" and value is not None:  # run_name=on, resume=no, experiment=1.10
            msg += (f" (YAML read the value as {type(value).__name__} {value!r}; quote it to pass the text: "
                    f"""{key}='"..."'""" + ")")
        lines.append(f"config key {key}{shown}: {msg}")
    return "\n".join(lines)


def load_config(path: str | Path | None, overrides: list[str] = (), base: dict | None = None,
                flags: dict[str, str | None] | None = None) -> Config:
    """The config file, then `overrides` (key=value, values read as YAML), then `flags`: top-level
    keys given by a command-line flag (--resume PATH), set as the plain string typed (a None is
    not given). A flag's value is a path, not YAML: read as YAML, `runs/exp #2` would lose its
    '#2', `[best]/ckpt` be refused and `2026-12-07` become a date."""
    raw: dict = dict(base or {})
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            loaded = load_yaml(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
        raw.update(loaded)
    raw = apply_overrides(raw, list(overrides))
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    raw.update(flags)
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_explain(e, flags)) from None


def config_hash(cfg: Config) -> str:
    """Identifies what a run trains: the digest of the settings resuming may not change."""
    return sha256_json(resume_critical(cfg))[:16]


# Keys that may change between a run and its resumption; everything else must match. run_dir is
# one of them: a run is recognised by the run_uid in RUN_DIR/.unit-run.json, not by its path,
# so a run directory that was moved or copied resumes.
RESUMABLE_CHANGES = ("train.max_steps", "train.log_every", "train.sample_every", "train.ckpt_every",
                     "train.keep_ckpts", "train.max_nonfinite", "train.threads", "train.compile", "resume",
                     "train.stall_timeout_s", "train.sample_count",  # the watchdog and the grids: not the training
                     "model.tta",  # how eval-mode translations are averaged: not the training
                     "trust_resume_path", "run_dir", "tracking", "eval", "init_from",
                     "train.realism",  # in checkpoints of runs from before the eval section: ignored
                     "registry", "data.num_workers", "data.cache_dir", "data.cache_bytes", "data.verify_shards", "deepspeed_config",
                     "data.test_a", "data.test_b", "data.shards", "data.shards_a", "data.shards_b")


def resume_critical(cfg: Config | dict) -> dict:
    flat = flatten(cfg.model_dump(mode="json") if isinstance(cfg, Config) else cfg)
    return {k: v for k, v in flat.items()
            if not any(k == r or k.startswith(r + ".") for r in RESUMABLE_CHANGES)}


def resume_differences(saved: dict, cfg: Config) -> list[str]:
    """Settings that differ between a checkpoint's config and this one and break resuming.

    The saved config is validated first, so a checkpoint written before a setting existed compares
    with that setting's default; one that no longer validates is compared key by key."""
    try:
        old = resume_critical(Config.model_validate(saved))
        keys = None
    except ValidationError:
        old = resume_critical(saved)
        keys = set(old)
    new = resume_critical(cfg)
    keys = keys if keys is not None else set(old) | set(new)
    return [f"{k}: checkpoint has {old.get(k)!r}, config has {new.get(k)!r}"
            for k in sorted(keys) if old.get(k) != new.get(k)]


# ---------------------------------------------------------------- DeepSpeed config
#
# The YAML generates the DeepSpeed dict of each engine. A DeepSpeed JSON (deepspeed_config) may add
# keys and may set what the YAML leaves at its default (ZeRO stage, accumulation, clipping); a key
# both set to different values is a conflict, reported before any rank starts.

def _explicit(section, name: str) -> bool:
    return name in section.model_fields_set


def _ds_basics(cfg: Config, ds: dict, conflicts: list[str], world: int | None = None) -> None:
    """Micro-batch, accumulation, ZeRO stage and clipping."""
    if "train_micro_batch_size_per_gpu" in ds and ds["train_micro_batch_size_per_gpu"] != cfg.data.batch_size:
        conflicts.append(f"train_micro_batch_size_per_gpu: DeepSpeed JSON has {ds['train_micro_batch_size_per_gpu']!r}, "
                         f"YAML (data.batch_size) has {cfg.data.batch_size!r}")
    ds["train_micro_batch_size_per_gpu"] = cfg.data.batch_size
    ds["steps_per_print"] = 10 ** 9
    global_batch = ds.pop("train_batch_size", None)  # DeepSpeed derives it from the micro-batch and accumulation
    if global_batch is not None and "gradient_accumulation_steps" not in ds:
        # with the YAML's accumulation added, DeepSpeed's batch assertion would fail
        conflicts.append(f"train_batch_size: DeepSpeed JSON has {global_batch!r} without "
                         "gradient_accumulation_steps; the global batch is data.batch_size x accumulation x ranks: "
                         "set gradient_accumulation_steps (or train.grad_accum_steps) instead")
        global_batch = None
    for key, field, json_value, set_value in (
            ("gradient_accumulation_steps", "grad_accum_steps", ds.get("gradient_accumulation_steps"),
             lambda v: ds.__setitem__("gradient_accumulation_steps", v)),
            ("zero_optimization.stage", "zero_stage", ds.get("zero_optimization", {}).get("stage"),
             lambda v: ds.setdefault("zero_optimization", {}).__setitem__("stage", v))):
        yaml_value = getattr(cfg.train, field)
        if json_value is not None and _explicit(cfg.train, field) and json_value != yaml_value:
            conflicts.append(f"{key}: DeepSpeed JSON has {json_value!r}, YAML train.{field} has {yaml_value!r}")
        set_value(yaml_value if json_value is None or _explicit(cfg.train, field) else json_value)
    if global_batch is not None:
        _ds_global_batch(global_batch, cfg.data.batch_size, ds["gradient_accumulation_steps"], world, conflicts)
    # DeepSpeed 0.19 clips gradients to norm 1.0 unless told otherwise; the paper does not clip.
    clip = cfg.optim.grad_clip
    if clip is not None and "gradient_clipping" in ds and float(ds["gradient_clipping"]) != clip:
        conflicts.append(f"gradient_clipping: DeepSpeed JSON has {ds['gradient_clipping']!r}, YAML optim.grad_clip has {clip!r}")
    ds["gradient_clipping"] = float(clip if clip is not None else ds.get("gradient_clipping", 0.0))
    stage = ds["zero_optimization"]["stage"]
    if stage not in (0, 1, 2):
        conflicts.append(f"zero_optimization.stage: {stage!r}; UNIT's two-engine step is exact at stages 0, 1 and 2")
    if "max_grad_norm" in ds:
        conflicts.append("max_grad_norm: not a DeepSpeed key; use top-level gradient_clipping")


def _ds_global_batch(global_batch: int, micro: int, accum: int, world: int | None, conflicts: list[str]) -> None:
    """A DeepSpeed JSON's train_batch_size must be what the YAML makes of it: data.batch_size x
    gradient accumulation x ranks. Before launch the number of ranks is unknown: it must at least be a
    multiple of the per-rank batch; on the ranks (world known) it must match exactly."""
    per_rank = micro * accum
    made = f"data.batch_size ({micro}) x gradient_accumulation_steps ({accum}) x ranks"
    if global_batch % per_rank:
        conflicts.append(f"train_batch_size: DeepSpeed JSON has {global_batch!r}, the YAML's global batch is {made}, "
                         f"a multiple of {per_rank}; leave train_batch_size out (DeepSpeed derives it)")
    elif world is not None and global_batch != per_rank * world:
        conflicts.append(f"train_batch_size: DeepSpeed JSON has {global_batch!r}, the YAML's global batch is {made} "
                         f"= {per_rank * world} on these {world} rank(s); leave train_batch_size out (DeepSpeed "
                         "derives it)")


def _ds_optimizer(cfg: Config, ds: dict, lr: float, on_gpu: bool, conflicts: list[str]) -> None:
    opt = {"lr": lr, "betas": list(cfg.optim.betas), "eps": cfg.optim.eps,
           "weight_decay": cfg.optim.weight_decay, "adam_w_mode": cfg.optim.adam_w_mode}
    if "optimizer" in ds:
        given = ds["optimizer"].get("params", {})
        for k, v in opt.items():
            if k in given and (list(given[k]) if isinstance(given[k], (list, tuple)) else given[k]) != v:
                conflicts.append(f"optimizer.params.{k}: DeepSpeed JSON has {given[k]!r}, YAML optim has {v!r}")
        for k in sorted(set(given) - set(opt)):  # never dropped without a word
            conflicts.append(f"optimizer.params.{k}: not passed on; UNIT's Adam takes {', '.join(opt)} (YAML optim)")
        kind = str(ds["optimizer"].get("type", "Adam")).lower()
        if kind not in ("adam", "adamw"):
            conflicts.append(f"optimizer.type: {ds['optimizer'].get('type')!r}; UNIT trains with Adam")
        elif kind == "adamw" and not cfg.optim.adam_w_mode:  # DeepSpeed's AdamW decouples the decay
            conflicts.append(f"optimizer.type: DeepSpeed JSON has {ds['optimizer']['type']!r} (decoupled weight "
                             "decay), YAML optim.adam_w_mode has False; set optim.adam_w_mode: true")
    params = dict(opt)
    if not on_gpu:
        params["torch_adam"] = True  # DeepSpeed's fused Adam needs a GPU; torch's is exact on CPU
        # torch's fused CPU kernel: ~8x faster than its per-tensor loop, the same update to rounding
        params["fused"] = True
    ds["optimizer"] = {"type": "Adam", "params": params}


def _ds_scheduler(cfg: Config, ds: dict, conflicts: list[str]) -> None:
    """optim.schedule is not a DeepSpeed scheduler: the engines get it as a per-step factor
    (launch.training.engines.lr_factor). DeepSpeed's WarmupLR runs its first two steps at
    warmup_min_lr and warms up over at least 2 steps whatever it is told."""
    if "scheduler" in ds:
        conflicts.append(f"scheduler: DeepSpeed JSON has {ds['scheduler'].get('type')!r}; the learning-rate schedule "
                         f"is YAML optim.schedule ({cfg.optim.schedule!r}) and optim.warmup_steps")


def resolve_precision(requested: str, cuda: bool, bf16_ok: bool) -> str:
    """What train.precision means on this machine: "fp32", "bf16" or "fp16".

    auto: bf16 where the GPU has it natively (Ampere and later), fp16 on older GPUs (V100, T4:
    bf16 there is emulated, slower than fp32), fp32 on CPU: there bf16 is slower than fp32 without
    native bf16 instructions, and with them (AMX, AVX512-BF16) it changes the numerics the CPU
    recipes were tuned in, for 0.69-0.74x fp32's time at the official preset and 0.87x at the demo's
    width (bench/step.py, README). An explicit bf16 is honoured on CPU but refused on a GPU
    without native bf16; fp16 needs a GPU (DeepSpeed's CPU accelerator
    refuses it). Both refusals are ConfigErrors that name the key, before any engine is built."""
    if requested == "auto":
        return ("bf16" if bf16_ok else "fp16") if cuda else "fp32"
    if requested == "fp16" and not cuda:
        raise ConfigError("config key train.precision = 'fp16': needs a CUDA GPU (DeepSpeed refuses fp16 on CPU); "
                          "use bf16 or fp32 on CPU, or auto")
    if requested == "bf16" and cuda and not bf16_ok:
        raise ConfigError("config key train.precision = 'bf16': this GPU has no native bf16 (it would be emulated, "
                          "slower than fp32); use fp16 or auto")
    return requested


def cpu_bf16_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> list[str]:
    """The CPU's bf16 instructions (AMX-BF16, AVX512-BF16) that /proc/cpuinfo lists; none when unreadable."""
    try:
        flags = cpuinfo.read_text().split()
    except OSError:
        return []
    return [f for f in ("amx_bf16", "avx512_bf16") if f in flags]


def cpu_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """A CPU with bf16 instructions (see cpu_bf16_flags)."""
    return bool(cpu_bf16_flags(cpuinfo))


def precision_warning(precision: str, on_gpu: bool, cpu_bf16: bool) -> str | None:
    """What to tell a run whose resolved precision is much slower than fp32 here: bf16 on a CPU
    without bf16 instructions, where torch runs bf16 convolutions in ATen's reference kernels (the
    official preset's iteration at 64 px: 59.6 s against 3.3 s in fp32 on a 6 December AVX2 EPYC).
    Honoured, not refused: the CPU dry runs of the GPU paths train in bf16 on purpose."""
    if precision != "bf16" or on_gpu or cpu_bf16:
        return None
    return ("warning: train.precision is bf16 on a CPU without bf16 instructions (no AMX-BF16 or AVX512-BF16 in "
            "/proc/cpuinfo): torch emulates it, about 18x slower than fp32 at the official preset; fp32, or auto "
            "(fp32 on CPUs), trains faster here")


def native_bf16() -> bool:
    """A CUDA device with bf16 in hardware (compute capability 8 or later), not emulated."""
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


# fp16 loss scaling: dynamic (loss_scale 0), starting at 2**16, doubled after 1000 clean steps,
# halved after 2 overflows in a row. A DeepSpeed JSON's fp16 section may tune these.
FP16_DEFAULTS = {"loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2,
                 "min_loss_scale": 1}


def _ds_precision(cfg: Config, ds: dict, on_gpu: bool, bf16_ok: bool, conflicts: list[str]) -> None:
    """bf16 is torch.autocast inside DeepSpeed (fp32 weights and optimizer): DeepSpeed's own bf16 mode
    would keep the weights, inputs and loss reductions in bf16. fp16 is DeepSpeed's fp16 mode (half
    weights, fp32 master copy, dynamic loss scaling)."""
    precision = cfg.train.precision
    resolved = resolve_precision(precision, on_gpu, bf16_ok)
    if cfg.train.compile and resolved == "bf16" and not on_gpu:
        # torch 2.13's inductor, CPU code, bf16 autocast: every generator gradient came out NaN (the
        # forward and the losses fine) at the official preset's width 64, at 32, 64 and 128 px (README).
        raise ConfigError("config keys train.compile = true with train.precision = 'bf16' on CPU ranks: "
                          "torch.compile's CPU code gives non-finite gradients in bf16 (README, configuration "
                          "reference: train.compile); use train.precision fp32 or auto with compile, or "
                          "train.compile false with bf16")
    if resolved == "fp16" and cfg.model.dis_norm == "sn":
        # DeepSpeed's fp16 mode casts parameters to half and keeps buffers fp32: spectral norm's power
        # iteration (torch.mv of the half weight and its fp32 _u, _v buffers) fails on the first step.
        raise ConfigError(f"config keys model.dis_norm = 'sn' with train.precision = {precision!r} ({resolved} "
                          "here): spectral norm does not run under DeepSpeed's fp16 (half weights, fp32 power-"
                          "iteration buffers); use model.dis_norm none, or train.precision fp32")
    wants = {"fp16": resolved == "fp16", "bf16": resolved == "bf16", "torch_autocast": resolved == "bf16"}
    for key, ok in wants.items():
        if key in ds and ds[key].get("enabled", False) not in (False, "auto") and not ok:
            conflicts.append(f"{key}.enabled: DeepSpeed JSON enables it, YAML train.precision is {precision!r} "
                             f"({resolved} here)")
    ds["fp16"] = {**FP16_DEFAULTS, **ds.get("fp16", {}), "enabled": True} if resolved == "fp16" else {"enabled": False}
    ds["bf16"] = {"enabled": False}
    # lower_precision_safe_modules []: gradients are all-reduced in fp32 (DeepSpeed's default would
    # reduce the conv weights' gradients in bf16, which rounds the sum across ranks).
    ds["torch_autocast"] = ({"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
                            if resolved == "bf16" else {"enabled": False})


def deepspeed_config(cfg: Config, ds_json: dict | None, *, lr: float, on_gpu: bool, bf16_ok: bool,
                     world: int | None = None) -> dict:
    """One engine's DeepSpeed config, generated from the YAML with the DeepSpeed JSON's additions.
    `world`: the number of ranks, where known (a JSON's train_batch_size is then checked exactly)."""
    if ds_json is not None:
        check_ds_json(ds_json, "DeepSpeed JSON")
    ds, conflicts = copy.deepcopy(ds_json or {}), []
    _ds_basics(cfg, ds, conflicts, world)
    _ds_optimizer(cfg, ds, lr, on_gpu, conflicts)
    _ds_scheduler(cfg, ds, conflicts)
    _ds_precision(cfg, ds, on_gpu, bf16_ok, conflicts)
    if conflicts:
        raise ConfigError("DeepSpeed config conflicts with the YAML:\n  " + "\n  ".join(conflicts))
    return ds


def load_ds_json(path: str | None) -> dict | None:
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"deepspeed_config {p} does not exist")
    try:
        ds = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed_config {p} is not valid JSON: {e}") from None
    check_ds_json(ds, f"deepspeed_config {p}")
    return ds


# The DeepSpeed JSON's sections that the YAML's config is merged into (with an example of each for
# the refusal), and its counts.
DS_SECTIONS = {"zero_optimization": '{"stage": 1}', "fp16": '{"enabled": true}', "bf16": '{"enabled": true}',
               "torch_autocast": '{"enabled": true}', "optimizer": '{"type": "Adam", "params": {}}',
               "scheduler": '{"type": "WarmupLR"}'}
DS_COUNTS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def check_ds_json(ds, source: str) -> None:
    """The shape the merge relies on (an object whose sections are objects, counts that are integers),
    refused naming the key, the value and what is allowed, before DeepSpeed (or the merge) fails on it."""
    def bad(key: str, value, allowed: str):
        raise ConfigError(f"{source}: {key} = {json.dumps(value)}: must be {allowed}")

    if not isinstance(ds, dict):
        raise ConfigError(f"{source}: must hold a JSON object ({{\"zero_optimization\": {{\"stage\": 1}}, ...}}), "
                          f"not {json.dumps(ds)[:80]}")
    for key, example in DS_SECTIONS.items():
        if key in ds and not isinstance(ds[key], dict):
            bad(key, ds[key], f"an object (e.g. {example})")
    if not isinstance(ds.get("optimizer", {}).get("params", {}), dict):
        bad("optimizer.params", ds["optimizer"]["params"], 'an object (e.g. {"lr": 0.0001})')
    for key in DS_COUNTS:
        v = ds.get(key)
        if key in ds and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            bad(key, v, "an integer >= 1")
    stage = ds.get("zero_optimization", {}).get("stage")
    if stage is not None and (isinstance(stage, bool) or not isinstance(stage, int)):
        bad("zero_optimization.stage", stage, "an integer: 0, 1 or 2")
    clip = ds.get("gradient_clipping")
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or clip < 0):
        bad("gradient_clipping", clip, "a number >= 0 (0: off)")


# The DeepSpeed settings a resumed run must keep, whichever file supplies them: the ZeRO stage is the
# optimizer state's layout (a ZeRO-1 state resumed at stage 0 fails in load_state_dict on the ranks,
# a stage-0 state resumed at 1 or 2 silently restarts Adam's moments); accumulation and clipping
# change the training as their YAML keys (train.grad_accum_steps, optim.grad_clip) would.
DS_RESUME_KEYS = ("zero_optimization.stage", "gradient_accumulation_steps", "gradient_clipping")


def launched_ds_settings(config: dict, ds_json: dict | None) -> dict:
    """DS_RESUME_KEYS as _ds_basics resolved them for a run with this config dump and DeepSpeed JSON.
    A dump lists every field, so a YAML value at its default reads as unset and the JSON's wins (a
    YAML that set a default its JSON contradicted was refused before launch, so never ran)."""
    ds, train = ds_json or {}, config.get("train", {})

    def pick(field: str, json_value):
        default = TrainSection.model_fields[field].default
        value = train.get(field, default)
        return json_value if json_value is not None and value == default else value

    clip = config.get("optim", {}).get("grad_clip")
    return {"zero_optimization.stage": pick("zero_stage", ds.get("zero_optimization", {}).get("stage")),
            "gradient_accumulation_steps": pick("grad_accum_steps", ds.get("gradient_accumulation_steps")),
            "gradient_clipping": float(clip if clip is not None else ds.get("gradient_clipping", 0.0))}


def ds_resume_record(ds: dict) -> dict:
    """What a checkpoint's meta.json keeps of the resolved DeepSpeed config `ds`: DS_RESUME_KEYS in
    its own shape (not the whole config: a user's JSON may hold a monitor's API key)."""
    return {"zero_optimization": {"stage": ds.get("zero_optimization", {}).get("stage", 0)},
            "gradient_accumulation_steps": ds.get("gradient_accumulation_steps", 1),
            "gradient_clipping": ds.get("gradient_clipping", 0.0)}


def ds_resume_differences(path: Path, meta: dict, cfg: Config, ds_json: dict | None) -> list[str]:
    """DS_RESUME_KEYS that differ between the run that wrote checkpoint `path` and `cfg` with `ds_json`.
    The checkpoint's side: the resolved DeepSpeed config in its meta.json where it has one, else its
    config with the DeepSpeed JSON that names (deepspeed_config may move, so it is read again now)."""
    if isinstance(meta.get("deepspeed"), dict):
        old = launched_ds_settings({}, meta["deepspeed"])
    else:
        saved_json = meta["config"].get("deepspeed_config")
        try:
            old = launched_ds_settings(meta["config"], load_ds_json(saved_json))
        except ConfigError as e:
            raise ConfigError(f"checkpoint {path} was trained with deepspeed_config {saved_json!r}, which cannot be "
                              f"read now ({e}): its ZeRO stage, gradient accumulation and clipping cannot be "
                              "compared with this config's; make that file readable at that path again") from None
    new = launched_ds_settings(cfg.model_dump(mode="json"), ds_json)
    return [f"DeepSpeed {k}: checkpoint has {old[k]!r}, config has {new[k]!r}" for k in DS_RESUME_KEYS
            if old[k] != new[k]]


def resume_point(cfg: Config, ds_path: str | None = None) -> Path | None:
    """The checkpoint this config resumes from (None: step 0), after every check that can refuse it:
    the run directory (owned, not a system folder), `resume` (a complete checkpoint, inside run_dir
    or trusted) and the checkpoint's config and DeepSpeed settings (no change that breaks resuming)
    against this config's, with the DeepSpeed JSON at `ds_path` (default: deepspeed_config). Reads only."""
    from launch.training.checkpoint import RunDirError, plan_resume

    try:
        path = plan_resume(cfg.run_dir, cfg.resume, cfg.trust_resume_path)
    except RunDirError as e:
        raise ConfigError(str(e)) from None
    if path is None:
        return None
    try:
        meta = json.loads((path / "meta.json").read_text())
        saved = meta["config"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"checkpoint {path}: meta.json is unreadable or has no config ({e}); "
                          "resume from another checkpoint") from None
    ds_json = load_ds_json(ds_path or cfg.deepspeed_config)
    diff = resume_differences(saved, cfg) + ds_resume_differences(path, meta, cfg, ds_json)
    diff += precision_differences(meta, cfg)
    if diff:
        raise ConfigError(f"checkpoint {path} holds a run whose config differs in ways that break resuming:\n  "
                          + "\n  ".join(diff) + "\nuse a new run_dir (or change the settings back)")
    check_resume_step(path, meta, cfg)
    return path


def check_resume_step(path: Path, meta: dict, cfg: Config) -> None:
    """train.max_steps may change on resume, but not to below the checkpoint's step: the run would
    train a negative number of steps and export the checkpoint's weights as if it had finished."""
    step = meta.get("step")
    if isinstance(step, int) and cfg.train.max_steps < step:
        raise ConfigError(f"config key train.max_steps = {cfg.train.max_steps}: below step {step} of the checkpoint "
                          f"{path} this run resumes from; set train.max_steps >= {step}, or resume an earlier "
                          "checkpoint (resume=PATH) or start a new run_dir")


def checkpoint_precision(meta: dict) -> str | None:
    """The resolved precision (fp32, bf16, fp16) the checkpoint was trained in: its meta.json's record,
    else its config's explicit train.precision; None for an "auto" of a checkpoint without the record
    (written before 7 December: what auto resolved to on its machine is not known)."""
    if meta.get("precision") in ("fp32", "bf16", "fp16"):
        return meta["precision"]
    saved = meta.get("config", {}).get("train", {}).get("precision", "auto")
    return saved if saved in ("fp32", "bf16", "fp16") else None


def precision_differences(meta: dict, cfg: Config) -> list[str]:
    """A switch into or out of fp16 between the checkpoint and what train.precision resolves to here:
    DeepSpeed's fp16 engines keep half weights and a loss scaler, which the fp32 engines of fp32 and
    bf16 (autocast over fp32 weights) neither save nor load, so the resumed engines would fail on the
    ranks. Compared as resolved, not as the word: "auto" is bf16 on one GPU and fp16 on another."""
    import torch

    old = checkpoint_precision(meta)
    new = resolve_precision(cfg.train.precision, torch.cuda.is_available(), native_bf16())
    if old is None or old == new or "fp16" not in (old, new):
        return []
    saved = meta.get("config", {}).get("train", {}).get("precision", "auto")
    return [f"train.precision: checkpoint trained in {old} (train.precision {saved!r}), config has "
            f"{cfg.train.precision!r}, which is {new} here; DeepSpeed's fp16 state does not resume into fp32/bf16 "
            "engines or back"]


def check_shard_index(cfg: Config) -> None:
    """Each domain's shards are found before a rank starts, not only when each rank builds its
    loader: an OUT folder or index.json, local or at a URL, is read (so a bucket or URL that is not
    there, or a backend that is not installed, fails here) and every shard URL it names is checked
    (no commands, nothing outside the index's folder). Messages name the key and the URL without
    credentials; the index's own messages are redacted already (pipeline.index)."""
    from pipeline.loader import resolve_shards
    from pipeline.storage import redact, redact_text

    for d, spec in zip(("a", "b"), cfg.data.sources()):
        key = f"data.shards_{d}" if getattr(cfg.data, f"shards_{d}") is not None else "data.shards"
        try:
            resolve_shards(spec, d)
        except (ValueError, OSError, ImportError) as e:
            raise ConfigError(f"config key {key} = {redact(spec)!r}: {redact_text(str(e))}") from None


def check_init_from(cfg: Config) -> None:
    """An export dir must be one; a models:/ URI must be well formed (the registry is asked at start)."""
    from launch.runstore.artifacts import is_export_dir, read_meta
    from launch.runstore.models import parse_model_uri

    spec = cfg.init_from
    if spec is None:
        return
    try:
        if spec.startswith("models:/"):
            parse_model_uri(spec)
        elif not is_export_dir(spec):
            raise ValueError("not an export dir (translator.json + translator.safetensors) and not a models:/ URI")
        else:
            check_same_generator(read_meta(spec)["model"], cfg.model)
    except ValueError as e:
        raise ConfigError(f"config key init_from = {spec!r}: {e}") from None


# The UNITConfig fields that shape the generator side: an init_from translator must agree on them.
GENERATOR_FIELDS = ("channels", "dim", "n_down", "n_res", "n_shared", "norm", "up_norm", "activ", "pad_type",
                    "fused_upsample", "skip", "palette_a", "palette_b", "expected")


def check_same_generator(saved: dict, model: UNITConfig) -> None:
    """A palette "auto" fits any palette (the run takes the colours the weights come with), not
    a generator without one."""
    theirs = make_config(saved)
    diff = [f"model.{k}: it has {getattr(theirs, k)!r}, the config {getattr(model, k)!r}"
            for k in GENERATOR_FIELDS
            if getattr(theirs, k) != getattr(model, k) and (getattr(model, k) != "auto" or not getattr(theirs, k))]
    if diff:
        raise ValueError("its generator does not fit the model section (" + "; ".join(diff) + ")")


def check(cfg: Config, ds_path: str | None = None, world: int | None = None) -> dict:
    """Everything that can be checked before ranks start; returns the G-engine DeepSpeed config.
    `world`: the number of ranks where known (on the ranks), else None (before launch)."""
    ds_json = load_ds_json(ds_path or cfg.deepspeed_config)
    resume_from = resume_point(cfg, ds_path)
    for key in ("test_a", "test_b"):
        v = getattr(cfg.data, key)
        if v is not None and not Path(v).is_dir():
            raise ConfigError(f"config key data.{key} = {v!r}: not a directory")
    check_shard_index(cfg)
    if resume_from is None:  # init_from is read only by a run that starts at step 0 (trainer.claim)
        check_init_from(cfg)
    if cfg.eval.fid_features is not None and not Path(cfg.eval.fid_features).is_file():
        raise ConfigError(f"config key eval.fid_features = {cfg.eval.fid_features!r}: no such file "
                          "(a TorchScript feature extractor; leave it unset to skip FID/KID)")
    from launch.training.palette import model_with_palettes, saved_palettes
    # A palette "auto" on a photographic domain fails here, measured only where build() measures: a
    # resumed run (or one from a local init_from export) takes the colours its weights carry, since
    # data.shards and eval.baseline_images may have changed (resumable changes).
    init_dir = (Path(cfg.init_from) if resume_from is None and cfg.init_from
                and not cfg.init_from.startswith("models:/") else None)
    model_with_palettes(cfg, say=lambda *a: None, saved=saved_palettes(resume_from, init_dir))
    import torch
    return deepspeed_config(cfg, ds_json, lr=cfg.optim.lr_g, on_gpu=torch.cuda.is_available(), bf16_ok=native_bf16(),
                            world=world)


def port_in_use(port: int) -> str:
    """Why this host cannot listen on TCP `port` (all interfaces, as the launcher's rendezvous store
    does, address reuse allowed as it allows it); an empty string when it can."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
            s.listen(1)
        except OSError as e:
            return e.strerror or str(e)
    return ""


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m launch.config",
                                 description="Validate a training config and print it resolved.")
    ap.add_argument("config", help="YAML config")
    ap.add_argument("--deepspeed_config", "--deepspeed-config", default=None,  # both spellings, as launch/train.py
                    help="DeepSpeed JSON to check against the YAML")
    ap.add_argument("--resume", default=None, help="auto | never | a checkpoint directory (as launch/train.py takes it)")
    ap.add_argument("--master-port", type=int, default=None,
                    help="also check that this host can listen on this port, the launcher's --master_port "
                         "(make train passes MASTER_PORT): a second training on the same port fails in every rank")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=100")
    args = ap.parse_intermixed_args(argv)  # overrides on both sides of --deepspeed_config
    try:
        # as launch/train.py resolves it: the flags win over the overrides, so the printed config is the run's
        cfg = load_config(args.config, args.overrides,
                          flags={"resume": args.resume, "deepspeed_config": args.deepspeed_config})
        check(cfg)
        # Here, not in check(): the ranks run check() too, beside their own rank 0 holding the lock.
        from launch.runstore.rundir import run_lock_holder

        busy = run_lock_holder(cfg.run_dir)
        if busy:
            raise ConfigError(busy)
        why = port_in_use(args.master_port) if args.master_port is not None else ""
        if why:
            raise ConfigError(f"port {args.master_port} ({why}): another training on this host holds it? "
                              "Launch on a free port: make train MASTER_PORT=N, or deepspeed --master_port N")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    from launch.shutdown import end

    end(main())
