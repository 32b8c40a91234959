"""The headless CLI: the smoke-run main job, clear errors without a model, golden output, no overwriting."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ovis_u1.__main__ import main
from tests.golden import CHECKPOINT, assert_golden_image, case_params, requires_golden, tensors


@pytest.fixture
def no_models(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OVIS_U1_MODEL", raising=False)
    monkeypatch.setenv("OVIS_U1_MODELS_DIR", str(tmp_path / "nothing-here"))
    return tmp_path


def test_demo_without_weights_is_a_labelled_smoke_run(no_models, capsys):
    assert main(["demo", "--smoke-dir", str(no_models / "smoke"), "--out", str(no_models / "out")]) == 0
    printed = capsys.readouterr().out
    assert "SMOKE RUN" in printed and "random-weight" in printed
    for name in ("smoke_text_to_image.png", "smoke_edit.png"):
        image = np.asarray(Image.open(no_models / "out" / name))
        assert image.shape == (256, 256, 3) and image.std() > 0


def test_task_without_a_model_says_where_to_put_it(no_models, capsys):
    assert main(["t2i", "a cat"]) == 2
    err = capsys.readouterr().err
    assert "no Ovis-U1 model found" in err and "huggingface-cli download ATH-MaaS/Ovis-U1-3B" in err


@requires_golden
def test_t2i_writes_the_golden_image_and_never_overwrites(no_models):
    p = case_params("t2i")
    args = ["t2i", p["prompt"], "--model", str(CHECKPOINT), "--device", "cpu", "--dtype", "fp32",
            "--width", str(p["width"]), "--height", str(p["height"]), "--steps", str(p["steps"]),
            "--txt-cfg", str(p["txt_cfg"]), "--seed", str(p["seed"]), "--out", "out/cat.png"]
    (no_models / "out").mkdir()
    (no_models / "out" / "cat.png").write_bytes(b"the user's file")
    assert main(args) == 0
    assert (no_models / "out" / "cat.png").read_bytes() == b"the user's file"
    written = np.asarray(Image.open(no_models / "out" / "cat_00001.png"))
    assert_golden_image(written, tensors("t2i")["output_image_uint8"])


@requires_golden
def test_bad_request_is_a_clear_error(no_models, capsys):
    assert main(["t2i", "a cat", "--model", str(CHECKPOINT), "--width", "100", "--device", "cpu"]) == 2
    assert "width 100" in capsys.readouterr().err


@requires_golden
def test_fp8_weights_from_the_cli(no_models):
    args = ["t2i", "a cat", "--model", str(CHECKPOINT), "--device", "cpu", "--dtype", "fp32", "--weight-dtype",
            "fp8_e4m3fn", "--width", "64", "--height", "64", "--steps", "2", "--out", "fp8.png"]
    assert main(args) == 0
    image = np.asarray(Image.open(no_models / "fp8.png"))
    assert image.shape == (64, 64, 3) and image.std() > 0
