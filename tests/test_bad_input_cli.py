"""Bad input through the CLI (issue 9, class 9): output paths and input images are checked before the model is
loaded; every error is one ``error:`` line with exit code 2 and no traceback; Ctrl-C leaves no partial file."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import ovis_u1.__main__ as cli
from ovis_u1.__main__ import main
from tests.golden import CHECKPOINT, TINY_A, assert_golden_image, case_params, requires_golden, tensors

pytestmark = requires_golden
EDIT_INPUT = str(TINY_A / "cases" / "edit" / "input.png")


@pytest.fixture
def cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OVIS_U1_MODEL", raising=False)
    return tmp_path


@pytest.fixture
def no_load(monkeypatch):
    """The checks must fail before any model is loaded."""
    monkeypatch.setattr(cli, "load_model", lambda *a, **k: pytest.fail("the model was loaded before the check"))


def one_error_line(capsys, *names: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for name in names:
        assert name in lines[0], f"{name!r} not in {lines[0]!r}"
    return lines[0]


def then(_done, argv: list[str]) -> list[str]:
    """Evaluate a set-up expression (its value ignored), then give the arguments."""
    return argv


def t2i_args(*extra: str) -> list[str]:
    return ["t2i", "a cat", "--model", str(CHECKPOINT), "--device", "cpu", "--width", "64", "--height", "64",
            "--steps", "1", *extra]


PRE_LOAD = [
    ("out is a folder", lambda d: then((d / "outdir").mkdir(), t2i_args("--out", "outdir")), ["--out", "is a folder"]),
    ("out ends with a slash", lambda d: t2i_args("--out", "new/"), ["--out 'new/'", "is a folder"]),
    ("unknown extension", lambda d: t2i_args("--out", "cat.xyz"), ["cat.xyz", ".png"]),
    ("no extension", lambda d: t2i_args("--out", "cat"), ["'cat'", "extension"]),
    ("read-only folder", lambda d: t2i_args("--out", "/proc/ovis_u1_test/cat.png"), ["/proc", "cannot write"]),
    ("out under a file", lambda d: then((d / "f").write_text("x"), t2i_args("--out", "f/cat.png")), ["is a file"]),
    ("missing edit image", lambda d: ["edit", "nothere.png", "add a hat", "--model", str(CHECKPOINT)],
     ["nothere.png", "does not exist"]),
    ("edit image is a folder", lambda d: ["edit", str(d), "add a hat", "--model", str(CHECKPOINT)], ["is a folder"]),
    ("edit image is text", lambda d: then((d / "a.png").write_text("hello"), ["edit", "a.png", "hat"]),
     ["a.png", "not an image"]),
    ("truncated edit image", lambda d: then((d / "t.png").write_bytes(open(EDIT_INPUT, "rb").read()[:200]),
                                          ["edit", "t.png", "hat"]), ["t.png"]),
    ("extreme edit image", lambda d: then(Image.new("RGB", (10000, 10)).save(d / "long.png"), ["edit", "long.png", "hat"]),
     ["long.png", "10000×10", "crop or pad"]),
    ("missing understand image", lambda d: ["understand", "What?", "a.png", "b.png"], ["a.png", "does not exist"]),
    ("bad width", lambda d: t2i_args("--width", "100"), ["width 100"]),
    ("bad seed", lambda d: t2i_args("--seed", "-3"), ["seed -3"]),
    ("not an int", lambda d: t2i_args("--steps", "many"), ["--steps", "many"]),
    ("unknown device", lambda d: t2i_args("--device", "gpu0"), ["--device 'gpu0'"]),
    ("empty question", lambda d: ["understand", "  "], ["question"]),
]


@pytest.mark.parametrize("case, argv, names", PRE_LOAD, ids=[c for c, *_ in PRE_LOAD])
def test_errors_before_loading_are_one_line(cwd, no_load, capsys, case, argv, names):
    assert main(argv(cwd)) == 2
    one_error_line(capsys, *names)
    assert not any(cwd.rglob("*.png.*")), "a partial file was left"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_cuda_is_one_line(cwd, no_load, capsys):
    assert main(t2i_args("--device", "cuda:3", "--out", "cat.png")) == 2
    one_error_line(capsys, "--device 'cuda:3'", "--device cpu")


def test_model_path_that_is_a_file(cwd, capsys):
    assert main(["t2i", "a cat", "--model", str(CHECKPOINT / "config.json"), "--device", "cpu",
                 "--out", "cat.png"]) == 2
    one_error_line(capsys, "config.json", "is a file")


def test_markup_in_prompt_is_one_line_and_nothing_is_written(cwd, capsys):
    assert main(t2i_args("--out", "cat.png")[:1] + ["a cat<|im_end|>"] + t2i_args("--out", "cat.png")[2:]) == 2
    one_error_line(capsys, "prompt", "<|im_end|>")
    assert not list(cwd.iterdir())


def test_ctrl_c_during_sampling_leaves_no_file(cwd, capsys, monkeypatch):
    def interrupting(label):
        def report(step, total, *_):
            raise KeyboardInterrupt

        return report

    monkeypatch.setattr(cli, "step_printer", interrupting)
    assert main(t2i_args("--out", "out/cat.png", "--steps", "3")) == 130
    assert "no partial file was written" in capsys.readouterr().err
    assert not any(p.is_file() for p in cwd.rglob("*"))


def test_ctrl_c_while_saving_leaves_no_partial_file(cwd, capsys, monkeypatch):
    real_save = Image.Image.save

    def save_then_interrupt(self, fp, *args, **kwargs):
        real_save(self, fp, *args, **kwargs)  # the bytes are on disk under the temporary name
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", save_then_interrupt)
    assert main(t2i_args("--out", "cat.png")) == 130
    assert "no partial file was written" in capsys.readouterr().err
    assert list(cwd.iterdir()) == []


def test_after_the_errors_the_cli_still_writes_the_golden_image(cwd):
    p = case_params("t2i")
    args = ["t2i", p["prompt"], "--model", str(CHECKPOINT), "--device", "cpu", "--dtype", "fp32",
            "--width", str(p["width"]), "--height", str(p["height"]), "--steps", str(p["steps"]),
            "--txt-cfg", str(p["txt_cfg"]), "--seed", str(p["seed"]), "--out", "out/cat.png"]
    (cwd / "out").mkdir()
    (cwd / "out" / "cat.png").write_bytes(b"the user's file")
    assert main(args) == 0
    assert (cwd / "out" / "cat.png").read_bytes() == b"the user's file"  # never overwritten
    written = np.asarray(Image.open(cwd / "out" / "cat_00001.png"))
    assert_golden_image(written, tensors("t2i")["output_image_uint8"])
    assert sorted(p.name for p in (cwd / "out").iterdir()) == ["cat.png", "cat_00001.png"]  # no temporary left
