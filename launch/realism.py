"""Realism score without a download: a small CNN that tells real A from real B.

The classifier is trained on the training shards (real A labelled 0, real B labelled 1) for a
fixed small number of steps and saved as safetensors + JSON. The realism of a translator in
direction a2b is the classifier's accuracy on its a2b translations, i.e. the fraction
classified as B (and b2a: the fraction classified as A). Untranslated inputs score near 0,
so the identity baseline shows how much of the gap a translator closes.

    python -m launch.realism train --shards OUT --out DIR [--steps 300] [--size 32]
    python -m launch.realism score --classifier DIR --model <export dir | models:/...> \\
        --test-a DIR --test-b DIR

`realism_metrics(...)` is the trainer's hook: it trains (or reuses) the classifier next to
the run and returns {"realism_a2b", "realism_b2a"}.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

WEIGHTS_NAME = "classifier.safetensors"
META_NAME = "classifier.json"
FORMAT_VERSION = 1
DEFAULT_STEPS = 300
DEFAULT_SIZE = 32
LABELS = {"a": 0, "b": 1}


class DomainClassifier(nn.Module):
    """Three stride-2 convs, global average pool, one logit (> 0 means domain B).

    Global pooling keeps it about colour and texture statistics, which is what tells the two
    domains apart, and makes it cheap; `image_size` is the side every input is resized to.
    """

    def __init__(self, width: int = 16, image_size: int = DEFAULT_SIZE):
        super().__init__()
        self.width, self.image_size = int(width), int(image_size)
        w = self.width
        self.body = nn.Sequential(
            nn.Conv2d(3, w, 3, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(w, 2 * w, 3, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * w, 4 * w, 3, 2, 1), nn.LeakyReLU(0.2),
        )
        self.head = nn.Linear(4 * w, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """float NCHW in [-1, 1] (any size) -> logits [N]."""
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                              align_corners=False, antialias=True)
        return self.head(self.body(x).mean(dim=(2, 3))).squeeze(1)


# ---------------------------------------------------------------- training


def train_classifier(shards_a, out_dir, shards_b=None, *, image_size: int = DEFAULT_SIZE,
                     steps: int = DEFAULT_STEPS, batch_size: int = 16, lr: float = 1e-3, width: int = 16,
                     seed: int = 0, progress: bool = True) -> Path:
    """Train on real A vs real B from shards and save to `out_dir`; returns `out_dir`.

    `shards_a`/`shards_b`: anything pipeline.loader.UnpairedLoader takes (an OUT directory of
    `make shards` serves both domains, so `shards_b` defaults to `shards_a`).
    """
    from tqdm import tqdm

    from pipeline.loader import UnpairedLoader

    if steps < 1 or batch_size < 1 or image_size < 8:
        raise ValueError(f"train_classifier: steps={steps}, batch_size={batch_size} must be >= 1 and "
                         f"image_size={image_size} >= 8")
    shards_b = shards_a if shards_b is None else shards_b
    torch.manual_seed(seed)
    net = DomainClassifier(width, image_size)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    # rank 0 of 1 even inside a distributed job: the classifier sees every shard.
    loader = UnpairedLoader(shards_a, shards_b, batch_size=batch_size, image_size=image_size, seed=seed,
                            num_workers=0, augment={"train": True, "flip": True}, rank=0, world_size=1)
    labels = torch.cat([torch.zeros(batch_size), torch.ones(batch_size)])
    t0 = time.perf_counter()
    correct = []
    net.train()
    it = iter(loader)
    for _ in tqdm(range(steps), desc="realism classifier", unit="step", disable=not progress):
        batch = next(it)
        x = torch.cat([batch["a"], batch["b"]]).float()
        logits = net(x)
        loss = F.binary_cross_entropy_with_logits(logits, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        correct.append(float(((logits.detach() > 0).float() == labels).float().mean()))
    if hasattr(loader, "close"):
        loader.close()
    tail = correct[-max(1, steps // 10):]
    meta = {"format": FORMAT_VERSION, "width": width, "image_size": image_size, "labels": LABELS,
            "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
            "shards": [str(shards_a), str(shards_b)], "train_accuracy": float(np.mean(tail)),
            "seconds": time.perf_counter() - t0}
    save_classifier(out_dir, net.eval(), meta)
    return Path(out_dir)


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def save_classifier(out_dir, net: DomainClassifier, meta: dict) -> Path:
    """classifier.safetensors, then classifier.json (with the weights' sha256), each renamed into place."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    _atomic_write(out / WEIGHTS_NAME, lambda p: save_file(state, p, metadata={"format": "pt"}))
    meta = {**meta, "format": FORMAT_VERSION, "width": net.width, "image_size": net.image_size,
            "weights_sha256": _sha256(out / WEIGHTS_NAME)}
    _atomic_write(out / META_NAME, lambda p: Path(p).write_text(json.dumps(meta, indent=2, sort_keys=True)))
    return out


def load_classifier(dir, device="cpu") -> DomainClassifier:
    """The classifier saved in `dir`, in eval mode; its JSON is at `.meta`."""
    from safetensors.torch import load_file

    d = Path(dir)
    meta_path, weights = d / META_NAME, d / WEIGHTS_NAME
    if not meta_path.is_file() or not weights.is_file():
        raise FileNotFoundError(f"--classifier {d}: no realism classifier here (needs {META_NAME} and "
                                f"{WEIGHTS_NAME}; make one with `python -m launch.realism train`)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{meta_path}: not valid JSON ({e})") from None
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT_VERSION}")
    if meta.get("weights_sha256") and _sha256(weights) != meta["weights_sha256"]:
        raise ValueError(f"{weights}: sha256 does not match {META_NAME} (interrupted save or edited file; "
                         "train the classifier again)")
    net = DomainClassifier(meta["width"], meta["image_size"])
    net.load_state_dict(load_file(str(weights), device=str(device)))
    net.meta = meta
    return net.to(device).eval()


# ---------------------------------------------------------------- scoring


def _as_classifier(classifier) -> DomainClassifier:
    return classifier if isinstance(classifier, nn.Module) else load_classifier(classifier)


@torch.no_grad()
def prob_b(classifier, images, batch_size: int = 256) -> np.ndarray:
    """P(domain B) per image; `images` uint8 [N,H,W,3] RGB."""
    from launch.export import to_tensor

    net = _as_classifier(classifier)
    arr = np.asarray(images)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"images: expected uint8 [N,H,W,3], got {arr.dtype} {list(arr.shape)}")
    out = [torch.sigmoid(net(to_tensor(arr[i:i + batch_size]))) for i in range(0, len(arr), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros(0, np.float32)


def realism_score(classifier, translated_images, target_domain: str) -> float:
    """Fraction of `translated_images` (uint8 [N,H,W,3]) the classifier assigns to `target_domain`
    ("a" or "b"); `classifier` is a DomainClassifier or its directory."""
    if target_domain not in LABELS:
        raise ValueError(f"target_domain {target_domain!r} is not 'a' or 'b'")
    p = prob_b(classifier, translated_images)
    if not len(p):
        raise ValueError("realism_score: no images")
    hit = p > 0.5 if target_domain == "b" else p <= 0.5
    return float(hit.mean())


def score_translator(classifier, model, test_a=None, test_b=None, size: int | None = None) -> dict:
    """{"realism_a2b", "realism_b2a"} of `model` (generator module, pyfunc model or fn(images,
    direction)) on the images of `test_a` / `test_b` (folders); a direction without its folder is left out."""
    from launch.evaluate import as_translate_fn, load_folder

    net, fn, out = _as_classifier(classifier), as_translate_fn(model), {}
    for direction, src in (("a2b", test_a), ("b2a", test_b)):
        if src:
            _, x = load_folder(src, size)
            out[f"realism_{direction}"] = realism_score(net, np.asarray(fn(x, direction)), direction[-1])
    if not out:
        raise ValueError("score_translator: give test_a and/or test_b")
    return out


def realism_metrics(export_dir, shards_a, shards_b=None, test_a=None, test_b=None, *, classifier_dir,
                    image_size: int | None = None, steps: int = DEFAULT_STEPS, seed: int = 0) -> dict:
    """The trainer's hook: {"realism_a2b": x, "realism_b2a": y} for the translator in `export_dir`.

    Trains the classifier into `classifier_dir` unless one trained with the same shards, steps
    and seed is already there (so a resumed or repeated run does not train it again).
    `image_size` is the size test images are resized to (the training size); the classifier
    works at min(image_size, 32).
    """
    from launch.export import load_translator

    shards_b = shards_a if shards_b is None else shards_b
    csize = min(int(image_size or DEFAULT_SIZE), DEFAULT_SIZE)
    want = {"shards": [str(shards_a), str(shards_b)], "steps": steps, "seed": seed, "image_size": csize}
    meta_path = Path(classifier_dir) / META_NAME
    have = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if any(have.get(k) != v for k, v in want.items()):
        train_classifier(shards_a, classifier_dir, shards_b, image_size=csize, steps=steps, seed=seed,
                         progress=False)
    gen, _ = load_translator(export_dir)
    return score_translator(load_classifier(classifier_dir), gen, test_a, test_b, size=image_size)


# ---------------------------------------------------------------- CLI


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launch.realism",
                                 description="Realism score: a small real-A-vs-real-B classifier, and its accuracy on translations.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train the domain classifier on training shards")
    t.add_argument("--shards", required=True, help="OUT directory of `make shards` (or index.json)")
    t.add_argument("--out", required=True, help="directory for classifier.safetensors + classifier.json")
    t.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    t.add_argument("--size", type=int, default=DEFAULT_SIZE, help="classifier input side (images are resized)")
    t.add_argument("--batch", type=int, default=16, help="images per domain per step")
    t.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("score", help="realism of a translator's outputs on test folders")
    s.add_argument("--classifier", required=True, help="directory written by `train`")
    s.add_argument("--model", required=True, help="export directory or models:/<name>@<alias>")
    s.add_argument("--test-a", help="domain A images, translated a2b and scored as B")
    s.add_argument("--test-b", help="domain B images, translated b2a and scored as A")
    s.add_argument("--size", type=int, default=None, help="resize test images to N x N first")
    s.add_argument("--tracking-uri", default=None)
    s.add_argument("--no-log", action="store_true", help="do not log to the registry model's run")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "train":
            t0 = time.perf_counter()
            out = train_classifier(a.shards, a.out, image_size=a.size, steps=a.steps, batch_size=a.batch, seed=a.seed)
            meta = json.loads((out / META_NAME).read_text())
            print(f"realism classifier: {a.steps} steps of {a.batch}+{a.batch} images at {a.size}x{a.size} from "
                  f"{a.shards}; accuracy over the last {max(1, a.steps // 10)} training batches "
                  f"{meta['train_accuracy']:.3f}; {time.perf_counter() - t0:.0f} s; saved to {out}.")
            return 0
        if not (a.test_a or a.test_b):
            ap.error("score: give --test-a and/or --test-b")
        from launch.evaluate import load_folder, load_model

        net = load_classifier(a.classifier)
        model, info = load_model(a.model, a.tracking_uri)
        res = score_translator(net, model, a.test_a, a.test_b, size=a.size)
        print(f"model: {a.model}\nclassifier: {a.classifier}")
        print(f"{'direction':<10}{'n':>6}{'realism':>10}{'identity':>10}")
        for direction, src in (("a2b", a.test_a), ("b2a", a.test_b)):
            if src:
                _, x = load_folder(src, a.size)
                ident = realism_score(net, x, direction[-1])
                print(f"{direction:<10}{len(x):>6}{res[f'realism_{direction}']:>10.3f}{ident:>10.3f}")
        if info.get("run_id") and not a.no_log:
            from mlflow import MlflowClient

            c = MlflowClient()
            for k, v in res.items():
                c.log_metric(info["run_id"], f"test/{k}", v)
            print(f"logged to run {info['run_id']}")
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
