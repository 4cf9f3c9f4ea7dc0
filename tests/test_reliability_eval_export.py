"""`hstu eval`, `hstu export` and `train.init_from` load only checkpoints that verify (trainer/integrity.py):
`--checkpoint latest` falls back past a damaged newest checkpoint and honours checkpoint.dir, a DCP directory is
accepted everywhere, and a damaged / wrong / mismatched checkpoint is a one-line error (issue 14 §1, §2)."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from reliability_utils import run_cli, train_argv, truncate

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 6-step run whose checkpoints live in a custom checkpoint.dir (step_4, step_6; step_6 written
    after the final evaluation, so it holds the model results.json's final_metrics describe)."""
    root = tmp_path_factory.mktemp("trained")
    run, cache, cdir = root / "run", root / "cache", root / "elsewhere" / "ckpts"
    from hstu.trainer.cli import main

    assert main(train_argv(run, cache, "train.max_steps=6", f"checkpoint.dir={cdir}")) == 0
    assert sorted(os.listdir(cdir)) == ["latest", "step_00000004", "step_00000006"]
    return run, cache, cdir


def _copy(trained, tmp_path):
    run, cdir = tmp_path / "run", tmp_path / "ckpts"
    shutil.copytree(trained[0], run)
    shutil.copytree(trained[2], cdir)
    cfg = (run / "config.yaml").read_text().replace(str(trained[2]), str(cdir))
    (run / "config.yaml").write_text(cfg)
    return run, cdir


def _one_error_line(code, err):
    lines = [ln for ln in err.splitlines() if ln.startswith("hstu: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


def test_eval_latest_uses_checkpoint_dir_and_a_dcp_dir_gives_the_final_metrics(trained, capsys):
    run, _, cdir = trained
    final = json.loads((run / "results.json").read_text())["final_metrics"]
    for spec in ("latest", str(cdir / "step_00000006"), str(cdir)):
        code, out, err = run_cli(capsys, "eval", "--run-dir", str(run), "--checkpoint", spec, "--output",
                                 str(run / "e.json"))
        assert code == 0, err
        got = json.loads(out)
        assert got["checkpoint"] == str(cdir / "step_00000006")
        for k, v in final.items():
            assert got["metrics"][k] == pytest.approx(v, abs=1e-9), (spec, k)


def test_eval_latest_falls_back_past_a_damaged_newest_checkpoint(trained, tmp_path, capsys):
    run, cdir = _copy(trained, tmp_path)
    truncate(cdir / "step_00000006" / "__0_0.distcp")
    code, out, err = run_cli(capsys, "eval", "--run-dir", str(run), "--checkpoint", "latest")
    assert code == 0, err
    assert json.loads(out)["checkpoint"] == str(cdir / "step_00000004")
    assert "__0_0.distcp" in err and "falling back to" in err
    assert (cdir / "step_00000006").is_dir()  # eval only reads
    truncate(cdir / "step_00000004" / ".metadata")
    line = _one_error_line(*run_cli(capsys, "eval", "--run-dir", str(run), "--checkpoint", "latest")[::2])
    assert f"no checkpoint in {cdir} verifies" in line


@pytest.mark.parametrize("sidecar", [True, False])
def test_eval_truncated_best_pt_is_one_line(trained, tmp_path, capsys, sidecar):
    run, _ = _copy(trained, tmp_path)
    if sidecar:
        assert (run / "best.pt.manifest.json").exists()
    elif (run / "best.pt.manifest.json").exists():  # as if written by an older version: the read fails, one line
        os.remove(run / "best.pt.manifest.json")
    truncate(run / "best.pt")
    line = _one_error_line(*run_cli(capsys, "eval", "--run-dir", str(run))[::2])
    assert str(run / "best.pt") in line
    assert ("truncated" in line) if sidecar else ("cannot read" in line)


def test_eval_of_a_file_that_is_not_a_checkpoint_is_one_line(trained, capsys):
    run = trained[0]
    line = _one_error_line(*run_cli(capsys, "eval", "--run-dir", str(run), "--checkpoint",
                                    str(run / "config.yaml"))[::2])
    assert "config.yaml" in line and "as a checkpoint" in line


def test_eval_with_a_model_config_that_does_not_fit_names_the_tensors(trained, capsys):
    run = trained[0]
    line = _one_error_line(*run_cli(capsys, "eval", "--run-dir", str(run), "model.num_layers=3")[::2])
    assert "does not fit this model" in line and "missing encoder.layers.2." in line and "more" in line
    line = _one_error_line(*run_cli(capsys, "eval", "--run-dir", str(run), "model.embedding_dim=16")[::2])
    assert "shapes differ: " in line and "checkpoint (" in line and "vs model (" in line


def test_export_latest_falls_back_and_honours_checkpoint_dir(trained, tmp_path, capsys):
    import hstu.serving

    run, cdir = _copy(trained, tmp_path)
    flip = cdir / "step_00000006" / "__0_0.distcp"
    data = bytearray(flip.read_bytes())
    data[len(data) // 2] ^= 0xFF
    flip.write_bytes(bytes(data))
    out = tmp_path / "art"
    code, _, err = run_cli(capsys, "export", "--run-dir", str(run), "--out", str(out), "--checkpoint", "latest")
    assert code == 0, err
    assert "sha256 differs" in err and "__0_0.distcp" in err
    assert hstu.serving.load(str(out)).manifest["source"]["checkpoint"] == str(cdir / "step_00000004")
    line = _one_error_line(*run_cli(capsys, "export", "--run-dir", str(run), "--out", str(tmp_path / "a2"),
                                    "--checkpoint", str(run / "config.yaml"))[::2])
    assert "config.yaml" in line


def test_init_from_a_checkpoint_dir_takes_the_newest_that_verifies(trained, tmp_path, capsys):
    run, cdir = _copy(trained, tmp_path)
    truncate(cdir / "step_00000006" / "rng_rank0.pt")
    new = tmp_path / "new"
    code, _, err = run_cli(capsys, *train_argv(new, trained[1], "train.max_steps=1", f"train.init_from={cdir}"))
    assert code == 0, err
    assert f"from {cdir / 'step_00000004'}" in (new / "train.log").read_text() and "rng_rank0.pt" in err
    truncate(run / "best.pt")
    line = _one_error_line(*run_cli(capsys, *train_argv(tmp_path / "n2", trained[1], "train.max_steps=1",
                                                        f"train.init_from={run / 'best.pt'}"))[::2])
    assert "train.init_from" in line and "best.pt" in line and not (tmp_path / "n2").exists()
