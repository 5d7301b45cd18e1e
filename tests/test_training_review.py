"""Review fixes in the trainer and the end of a run: sample grids never end training (uneven or
damaged test folders, a failing grid, the checkpoint written first), an end-of-run evaluation
error is a warning, and the stall watchdog's allowance for torch.compile's first steps.
The step runs on the plain engines of test_trainer_step.py."""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from launch.config import load_config
from launch.release import finish
from launch.training import samples
from launch.training import trainer as T
from launch.training.engines import compile_networks
from launch.training.watchdog import EXIT_STALLED, StallWatchdog
from pipeline.imageio import image_files
from test_trainer_step import make_trainer, steps


def uneven_folders(corpus, tmp_path, n_a: int, n_b: int) -> tuple[Path, Path]:
    out = []
    for name, n in (("testA", n_a), ("testB", n_b)):
        d = tmp_path / name
        d.mkdir()
        for p in image_files(corpus / "demo" / name)[:n]:
            shutil.copy(p, d / p.name)
        out.append(d)
    return out[0], out[1]


# ---------------------------------------------------------------- 1. sample grids


def test_uneven_test_folders_give_as_many_rows_as_both_sides_have(corpus, tmp_path):
    test_a, test_b = uneven_folders(corpus, tmp_path, 2, 4)
    x_a, x_b = samples.held_out_batch(str(test_a), str(test_b), 32, 4, side_stream=None)
    assert x_a.shape[0] == x_b.shape[0] == 2
    tr = make_trainer(corpus, tmp_path / "run")
    assert len(samples.sample_rows(tr.unit.gen, x_a, x_b)) == 4


def test_a_damaged_test_image_is_skipped_and_named(corpus, tmp_path, capsys):
    test_a, test_b = uneven_folders(corpus, tmp_path, 3, 3)
    (test_a / "zz-broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    x_a, x_b = samples.held_out_batch(str(test_a), str(test_b), 32, 4, side_stream=None)
    assert x_a.shape[0] == x_b.shape[0] == 3
    err = capsys.readouterr().out
    assert "warning" in err and "zz-broken.png" in err


def test_unusable_test_folders_fall_back_to_the_training_shards(corpus, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "x.png").write_bytes(b"not an image")
    batch = {"a": torch.zeros(3, 3, 8, 8, dtype=torch.uint8), "b": torch.full((3, 3, 8, 8), 255, dtype=torch.uint8)}
    x_a, x_b = samples.held_out_batch(str(empty), str(corpus / "demo" / "testB"), 32, 2, lambda: [batch])
    assert x_a.shape == x_b.shape == (2, 3, 8, 8) and float(x_a.max()) == -1.0
    assert "no usable images" in capsys.readouterr().out


def test_a_run_with_uneven_and_damaged_test_folders_checkpoints_samples_and_finishes(corpus, tmp_path):
    """The real launcher, 2 CPU ranks: grids and checkpoints due at the same steps, test folders of
    2 and 4 images, one of them damaged (it used to end rank 0's start-up, then every grid step)."""
    from trainutil import launch, write_config

    test_a, test_b = uneven_folders(corpus, tmp_path, 2, 4)
    (test_a / "zz-broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    path = write_config(tmp_path / "cfg.yaml", corpus, tmp_path / "run", max_steps=4, sample_every=2, ckpt_every=2)
    cfg = yaml.safe_load(path.read_text())
    cfg["data"].update(test_a=str(test_a), test_b=str(test_b))
    cfg["eval"] = {"c2st_steps": 0, "baseline_images": 16}
    path.write_text(yaml.safe_dump(cfg))
    r = launch(path, ranks=2)
    run = tmp_path / "run"
    assert (run / "ckpt" / "step-00000002" / "COMPLETE").is_file()
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step-00000002.png", "step-00000004.png"]
    assert "warning: sample grids: skipped" in r.stdout and "zz-broken.png" in r.stdout
    assert "trained 4 steps" in r.stdout


def test_a_failed_grid_keeps_the_generator_in_training_mode(corpus, tmp_path):
    tr = make_trainer(corpus, tmp_path / "run")
    x = torch.zeros(2, 3, 32, 32)
    with pytest.raises(ValueError, match="batch"):
        samples.sample_rows(tr.unit.gen, x, torch.zeros(3, 3, 32, 32))
    assert tr.unit.gen.training


def test_checkpoint_is_written_before_the_grid_and_a_failed_grid_is_a_warning(corpus, tmp_path, monkeypatch,
                                                                              capsys):
    tr = make_trainer(corpus, tmp_path / "run", sample_every=2, ckpt_every=2, max_steps=4)
    order = []
    monkeypatch.setattr(T, "save_checkpoint", lambda t: order.append(("ckpt", t.state.step)))

    def broken(*a, **kw):
        order.append(("grid", tr.state.step))
        raise OSError("No space left on device")

    monkeypatch.setattr(T, "save_grid", broken)
    meter = steps(tr, 4)
    assert tr.state.step == 4                                       # training went on
    assert order == [("ckpt", 2), ("grid", 2)]                      # step 4 is the last: run()'s to finish
    T.finish_checkpoint(tr, meter)
    assert order[2:] == [("ckpt", 4), ("grid", 4)]                  # its checkpoint, then its grid
    assert tr.unit.gen.training
    out = capsys.readouterr().out
    assert "warning: writing the sample grid for step 2 failed (OSError: No space left on device)" in out


def test_sample_grids_do_not_compile_an_eval_graph(corpus, tmp_path):
    """Under train.compile the grid runs eagerly: compiling its eval-mode graph would hold every rank
    (the others wait in the next step) and count against the stall watchdog."""
    tr = make_trainer(corpus, tmp_path / "run")
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compile_networks(tr.unit.gen, tr.unit.dis, backend=counting)
    x_a, x_b = tr.samples
    tr.unit.gen(x_a, x_b)  # the training step's graph
    compiled = len(graphs)
    assert compiled > 0
    T.write_samples(tr)
    assert len(graphs) == compiled and (tmp_path / "run" / "samples" / "step-00000000.png").is_file()
    torch._dynamo.reset()


# ---------------------------------------------------------------- 2. the end of a run


def finish_config(corpus, tmp_path, test_a, test_b, **data) -> tuple:
    from launch.runstore.artifacts import save_translator
    from model.unit import UNIT

    torch.manual_seed(0)
    unit = UNIT.from_config({"preset": "tiny"})
    export = save_translator(tmp_path / "export", unit.gen, unit.config(), 32, 3, False)
    cfg = load_config(None, base={
        "run_dir": str(tmp_path / "run"), "model": {"preset": "tiny"},
        "data": {"shards": str(corpus / "shards"), "image_size": 32, "test_a": str(test_a), "test_b": str(test_b),
                 **data},
        "eval": {"baseline_images": 16, "c2st_steps": 0},
        "tracking": {"enable": False}, "registry": {"enable": False}})
    return cfg, export


def test_an_evaluation_error_at_the_end_is_a_warning_with_the_command(corpus, tmp_path, capsys):
    a, b = tmp_path / "A", tmp_path / "B"
    for d, stem in ((a, "left"), (b, "right")):  # no stems in common: nothing to pair
        d.mkdir()
        shutil.copy(image_files(corpus / "demo" / "testA")[0], d / f"{stem}.png")
    cfg, export = finish_config(corpus, tmp_path, a, b)
    out = finish.finish_run(cfg, export)
    assert "evaluation" not in out
    msg = capsys.readouterr().out
    assert "warning: the end-of-run evaluation failed (ValueError: " in msg and "no file stems in common" in msg
    assert f"python -m launch.release.evaluate --model {export}" in msg


def test_unreachable_shards_at_the_end_are_a_redacted_warning(corpus, tmp_path, capsys):
    a = corpus / "demo" / "testA"
    cfg, export = finish_config(corpus, tmp_path, a, corpus / "demo" / "testB",
                                shards="http://user:s3cret@127.0.0.1:9/shards")
    assert finish.finish_run(cfg, export) == {}
    msg = capsys.readouterr().out
    assert "warning: estimating the baselines failed" in msg and "s3cret" not in msg
    assert "--shards" in msg


def test_train_exits_0_with_the_summary_when_the_evaluation_fails(corpus, tmp_path, monkeypatch, capsys):
    from launch import train

    a, b = tmp_path / "A", tmp_path / "B"
    for d, stem in ((a, "left"), (b, "right")):
        d.mkdir()
        shutil.copy(image_files(corpus / "demo" / "testA")[0], d / f"{stem}.png")
    cfg, export = finish_config(corpus, tmp_path, a, b)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    summary = {"rank": 0, "step": 6, "steps_run": 6, "seconds": 1.0, "nonfinite_total": 0, "checkpoint": "c",
               "run_dir": str(tmp_path / "run"), "export": str(export), "init_from": None}
    monkeypatch.setattr(T, "train", lambda cfg, ds: dict(summary))
    threads = torch.get_num_threads()
    try:
        assert train.main(["--config", str(path)]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "warning: the end-of-run evaluation failed" in out and "trained 6 steps" in out


# ---------------------------------------------------------------- 3. watchdog and torch.compile


@pytest.mark.parametrize("compile_", [True, False])
def test_the_first_compiled_step_has_its_own_allowance(corpus, tmp_path, monkeypatch, compile_):
    tr = make_trainer(corpus, tmp_path / "run", max_steps=2, compile=compile_)
    exits = []
    # Margins for a loaded machine: step 2 (compiled or not) takes well under the 3 s timeout, and
    # the first step's 4.5 s only stall without the allowance (the real compile comes on top).
    tr.watchdog = StallWatchdog(3.0, 0, exit=exits.append)
    monkeypatch.setattr(T, "COMPILE_ALLOWANCE_S", 120.0)
    monkeypatch.setattr(T, "save_checkpoint", lambda t: Path("ckpt"))
    monkeypatch.setattr(T, "export", lambda t: Path("export"))
    monkeypatch.setattr(T, "dist", SimpleNamespace(barrier=lambda: None))
    real, calls = T.train_step, []

    def slow_first(*a):
        calls.append(1)
        if len(calls) == 1:
            time.sleep(4.5)  # the lazy compile
        return real(*a)

    monkeypatch.setattr(T, "train_step", slow_first)
    T.run(tr)
    assert exits == ([] if compile_ else [EXIT_STALLED])


def test_the_allowance_ends_and_a_first_step_hang_is_still_caught():
    exits = []
    wd = StallWatchdog(0.3, 0, exit=exits.append)
    wd.start(allowance_s=0.5, until_step=1)
    time.sleep(0.6)
    assert exits == []                       # within timeout + allowance
    wd.beat(1)
    time.sleep(0.6)                          # step 2: the timeout alone
    assert exits == [EXIT_STALLED]
    wd.stop()

    exits.clear()
    wd = StallWatchdog(0.2, 0, exit=exits.append)
    wd.start(allowance_s=0.3, until_step=1)
    time.sleep(0.8)                          # a hang in the first step: caught, not watched forever
    assert exits == [EXIT_STALLED]
    wd.stop()


def test_lazy_r1_steps_are_inside_the_allowance(corpus, tmp_path):
    cfg = make_trainer(corpus, tmp_path / "run", compile=True).cfg
    assert T.compile_allowance_steps(cfg) == 1
    cfg.model.w_r1, cfg.model.r1_every = 1.0, 4
    assert T.compile_allowance_steps(cfg) == 4
    cfg.train.compile = False
    assert T.compile_allowance_steps(cfg) == 0
