"""python -m launch.release.register --run-dir DIR [--name NAME] [--test-a DIR --truth-b DIR]
                            [--test-b DIR --truth-a DIR] [--min-accuracy X] [--size N]

Registers RUN_DIR/export in the MLflow model registry (see launch/release/registry.py). Test folders and
the gate default to the run's config.yaml (data.test_a / data.test_b, registry.name,
registry.min_accuracy, and the size: data.augment.resize, else data.image_size) when the flags are not given.
Exit status: 0 registered (whether or not promoted), 2 bad input, 1 MLflow failure.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from launch.runstore.records import first_line
from pipeline.storage import redact_text, redact_uncaught


def run_config(run_dir: Path):
    """The run's validated config (launch.config.Config), or None when RUN_DIR has no config.yaml."""
    from launch.config import load_config
    from launch.runstore.rundir import CONFIG_NAME

    path = run_dir / CONFIG_NAME
    return load_config(path) if path.is_file() else None


def main(argv=None) -> int:
    redact_uncaught()  # an error no branch below expects must not print a password either
    p = argparse.ArgumentParser(prog="python -m launch.release.register", description=__doc__.split("\n\n")[1])
    p.add_argument("--run-dir", required=True)
    p.add_argument("--name", default=None, help="registered model name (default: config registry.name or unit-translator)")
    p.add_argument("--test-a", default=None)
    p.add_argument("--truth-b", default=None)
    p.add_argument("--test-b", default=None)
    p.add_argument("--truth-a", default=None)
    p.add_argument("--min-accuracy", type=float, default=None, help="gate threshold on test/pixel_acc_a2b")
    p.add_argument("--size", type=int, default=None, help="evaluate at N x N (default: the config's data.augment.resize, else data.image_size)")
    p.add_argument("--tracking-uri", default=None, help="default: the one in RUN_DIR/tracking.json")
    p.add_argument("--export-dir", default=None, help="default: RUN_DIR/export")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    a = p.parse_args(argv)
    run_dir = Path(a.run_dir)
    if not run_dir.is_dir():
        print(f"error: --run-dir {run_dir}: not a directory", file=sys.stderr)
        return 2
    from launch.config import ConfigError

    try:
        cfg = run_config(run_dir)
    except ConfigError as e:
        cfg = None
        print(f"warning: {run_dir}/config.yaml is not a valid config ({e}); its defaults are not used: give "
              "--name, the test folders, --min-accuracy and --size on the command line", file=sys.stderr)
    split = {"test_a": a.test_a, "truth_b": a.truth_b, "test_b": a.test_b, "truth_a": a.truth_a}
    if not any(split.values()) and cfg is not None:
        split = cfg.data.test_split() or split  # the paired split: testA/x.jpg pairs with testB/x.png
    if bool(split["test_a"]) != bool(split["truth_b"]) or bool(split["test_b"]) != bool(split["truth_a"]):
        p.error("--test-a needs --truth-b and --test-b needs --truth-a")
    from launch.release.registry import describe, dumps, register_run

    try:
        # MLflow prints "View run ..." lines on stdout; keep stdout for the result (--json).
        with contextlib.redirect_stdout(sys.stderr):
            res = register_run(run_dir, name=a.name or (cfg.registry.name if cfg else "unit-translator"), **split,
                               min_accuracy=a.min_accuracy if a.min_accuracy is not None
                               else (cfg.registry.min_accuracy if cfg else 0.0),
                               image_size=a.size or (cfg.data.scale() if cfg else None),
                               tracking_uri=a.tracking_uri, export_dir=a.export_dir)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {redact_text(str(e))}", file=sys.stderr)
        return 2
    except Exception as e:
        print(f"error: registering failed ({type(e).__name__}: {first_line(e)})", file=sys.stderr)
        return 1
    print(dumps(res) if a.json else describe(res))
    return 0


if __name__ == "__main__":
    from launch.shutdown import end

    end(main())
