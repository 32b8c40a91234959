"""Headless Ovis-U1: ``python -m ovis_u1 {demo,t2i,edit,understand,smoke-model,quantize}``.

The model folder comes from ``--model``, else ``$OVIS_U1_MODEL``, else the first Ovis-U1 folder under a ComfyUI
``models/ovis_u1/`` (``$OVIS_U1_MODELS_DIR``, ``./models/ovis_u1``, or the ComfyUI this pack is installed in).
``demo`` runs text-to-image → understanding → edit; without a model it builds a small random-weight Ovis-U1 and
says loudly that this is a smoke run (noise images, nonsense text).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from . import inputs, prompts
from .checkpoint import default_model_roots, find_model_dirs
from .errors import CheckpointError, OvisU1InputError
from .model import load_model
from .operations import WEIGHT_DTYPES
from .quantize import TYPES as QUANT_TYPES, quantize
from .smoke import build_smoke_model, is_smoke_model

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


class UsageError(Exception):
    """A command-line problem found before any model is loaded; printed as one ``error:`` line."""


def resolve_model(explicit: str | None) -> Path | None:
    if explicit:
        return Path(explicit)
    if os.environ.get("OVIS_U1_MODEL"):
        return Path(os.environ["OVIS_U1_MODEL"])
    found = find_model_dirs(default_model_roots())
    return found[0] if found else None


def no_model_message(hint_demo: bool = True) -> str:
    where = "\n  ".join(str(r) for r in default_model_roots())
    hint = " (`python -m ovis_u1 demo` runs a smoke test without it.)" if hint_demo else ""
    return (
        "no Ovis-U1 model found. Looked in:\n  " + where + "\n"
        "Download it with\n  huggingface-cli download ATH-MaaS/Ovis-U1-3B --local-dir models/ovis_u1/Ovis-U1-3B\n"
        "(the repository was AIDC-AI/Ovis-U1-3B before it moved; the old id redirects)\n"
        "or pass --model DIR / set OVIS_U1_MODEL." + hint
    )


def fresh_path(path: Path) -> Path:
    """``path`` if free, else the same name with the first free _NNNNN suffix — never overwrite a file."""
    if not path.exists():
        return path
    for i in range(1, 100000):
        candidate = path.with_name(f"{path.stem}_{i:05d}{path.suffix}")
        if not candidate.exists():
            return candidate
    raise FileExistsError(f"no free file name next to {path}")


def check_output_file(out: str, option: str = "--out") -> Path:
    """An image file name whose folder exists or can be made and is writable — checked before the model loads."""
    if out.endswith(("/", os.sep)) or Path(out).is_dir():
        raise UsageError(f"{option} {out!r} is a folder; give a file name in it, e.g. {option} "
                         f"{str(Path(out) / 'image.png')!r}")
    path = Path(out)
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        raise UsageError(f"{option} {out!r} has no known image extension; end it with one of "
                         f"{', '.join(IMAGE_EXTENSIONS)} (e.g. {str(path.with_suffix('.png'))!r})")
    check_writable_folder(path.parent, option, out)
    return path


def check_writable_folder(folder: Path, option: str, given: str) -> None:
    """``folder`` (or the nearest existing folder above it, where the rest would be made) exists as a folder and is
    writable."""
    existing = folder if str(folder) else Path(".")
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{option} {given!r}: {str(existing)!r} is a file, not a folder; choose another path")
    try:  # a real write: permission bits say nothing for root, nor for read-only mounts
        with tempfile.TemporaryFile(dir=existing, prefix=".ovis_u1_write_test"):
            pass
    except OSError as e:
        raise UsageError(f"{option} {given!r}: cannot write in the folder {str(existing)!r} ({e.strerror or e}); "
                         "choose a folder you can write to") from None


def open_image(path: str, option: str = "image"):
    """Open and decode an input image now, so a wrong path fails before the model is loaded."""
    try:
        image = Image.open(path)
        image.load()
        return image
    except FileNotFoundError:
        raise UsageError(f"{option} {path!r} does not exist") from None
    except IsADirectoryError:
        raise UsageError(f"{option} {path!r} is a folder; give an image file") from None
    except PermissionError:
        raise UsageError(f"{option} {path!r} cannot be read: permission denied") from None
    except UnidentifiedImageError:
        raise UsageError(f"{option} {path!r} is not an image PIL can read (use PNG, JPEG, WebP …)") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise UsageError(f"{option} {path!r} cannot be decoded ({e}); the file is truncated or corrupt") from None


def check_device(device: str | None) -> None:
    """An unavailable ``--device`` is a clear error before loading (torch would raise deep inside the load)."""
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise UsageError(f"--device {device!r} is not a device name ({e}); use cpu, cuda, cuda:1, mps …") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device!r}: CUDA is not available in this PyTorch/machine; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {device!r}: only {torch.cuda.device_count()} CUDA device(s) exist "
                             f"(cuda:0 … cuda:{torch.cuda.device_count() - 1})")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise UsageError(f"--device {device!r}: MPS is not available on this machine; use --device cpu")
    elif dev.type != "cpu":
        raise UsageError(f"--device {device!r} is not supported here; use cpu, cuda or mps")


def save_image(image, path: Path) -> Path:
    """Write to a hidden temporary name and link it into place: an interrupted save leaves no partial file, and an
    existing file is never overwritten (a name taken meanwhile moves on to the next free one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = _format_of(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        image.save(tmp, format=fmt)
        while True:
            final = fresh_path(path)
            try:
                os.link(tmp, final)
                break
            except FileExistsError:
                continue
            except OSError:  # no hard links on this filesystem
                os.replace(tmp, final)
                break
    finally:
        tmp.unlink(missing_ok=True)
    return final


def _format_of(path: Path) -> str:
    return Image.registered_extensions().get(path.suffix.lower(), "PNG")


def step_printer(label: str):
    start = time.time()

    def report(step: int, total: int, *_):
        print(f"\r{label}: step {step}/{total} ({time.time() - start:.1f}s)", end="\n" if step == total else "",
              flush=True)

    return report


def _load(args, path: Path):
    dtype = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    print(f"loading {path} ...", flush=True)
    return load_model(path, device=args.device, dtype=dtype, attention=args.attention,
                      weight_dtype=None if args.weight_dtype == "default" else args.weight_dtype)


def run_demo(args) -> int:
    check_writable_folder(Path(args.out), "--out", args.out)
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"--out {args.out!r} is a file; demo writes several images into a folder")
    check_device(args.device)
    path = resolve_model(args.model)
    smoke = path is None
    if smoke:
        path = Path(args.smoke_dir)
        if not (path / "model.safetensors").is_file():
            build_smoke_model(path)
        banner = ("SMOKE RUN — no Ovis-U1-3B found, so this runs a small random-weight Ovis-U1 built by the pack "
                  f"({path}). Its images are noise and its text is nonsense; it only proves the pipeline runs.")
        print("=" * 100 + "\n" + banner + "\n" + no_model_message(hint_demo=False) + "\n" + "=" * 100, flush=True)
    smoke = smoke or is_smoke_model(path)
    model = _load(args, path)
    out = Path(args.out)
    size, steps = (256, 10) if smoke else (1024, 50)
    tag = "smoke_" if smoke else ""

    prompt = "a red fox sitting in fresh snow, golden hour"
    image = model.text_to_image(prompt, width=size, height=size, steps=steps, txt_cfg=5.0, seed=42,
                                callback=step_printer("text-to-image"))
    t2i_path = save_image(image, out / f"{tag}text_to_image.png")
    print(f"text-to-image → {t2i_path}")

    answer = model.understand([Image.open(t2i_path)], "Describe this image in one sentence.",
                              max_new_tokens=32 if smoke else 256)
    print(f"understanding → {answer.text!r}")

    edited = model.edit(Image.open(t2i_path), "Make it night time with a full moon.", steps=steps, img_cfg=1.5,
                        txt_cfg=6.0, seed=42, callback=step_printer("edit"))
    edit_path = save_image(edited, out / f"{tag}edit.png")
    print(f"edit → {edit_path}")
    print("SMOKE RUN finished (random weights)." if smoke else "done.")
    return 0


def run_task(args) -> int:
    # Everything that can be checked without the model is checked first: a typo costs seconds, not a load.
    out = check_output_file(args.out) if args.command in ("t2i", "edit") else None
    if args.command == "t2i":
        inputs.check_prompt(args.prompt)
        inputs.check_size(args.width, args.height)
        inputs.check_steps(args.steps), inputs.check_cfg("txt_cfg", args.txt_cfg), inputs.check_seed(args.seed)
    elif args.command == "edit":
        inputs.check_prompt(args.instruction, "instruction")
        source = open_image(args.image)
        inputs.check_edit_image(source, f"image {args.image!r}")
        inputs.check_steps(args.steps), inputs.check_seed(args.seed)
        inputs.check_cfg("txt_cfg", args.txt_cfg), inputs.check_cfg("img_cfg", args.img_cfg)
        if args.context_seed is not None:
            inputs.check_seed(args.context_seed, "context_seed")
    else:
        inputs.check_prompt(args.question, "question")
        prompts.check_instruction(args.instruction)
        images = [open_image(p) for p in args.images]
        inputs.check_max_new_tokens(args.max_new_tokens), inputs.check_seed(args.seed)
        if args.sample:
            inputs.check_sampling(args.temperature, args.top_p)
    check_device(args.device)
    path = resolve_model(args.model)
    if path is None:
        print("error: " + no_model_message(), file=sys.stderr)
        return 2
    model = _load(args, path)
    if args.command == "t2i":
        image = model.text_to_image(args.prompt, width=args.width, height=args.height, steps=args.steps,
                                    txt_cfg=args.txt_cfg, seed=args.seed, callback=step_printer("text-to-image"))
        print(save_image(image, out))
    elif args.command == "edit":
        image = model.edit(source, args.instruction, steps=args.steps, img_cfg=args.img_cfg,
                           txt_cfg=args.txt_cfg, seed=args.seed, context_seed=args.context_seed,
                           callback=step_printer("edit"))
        print(save_image(image, out))
    else:
        answer = model.understand(images, args.question, max_new_tokens=args.max_new_tokens,
                                  do_sample=args.temperature > 0 and args.sample, temperature=args.temperature,
                                  top_p=args.top_p, seed=args.seed, instruction=args.instruction)
        print(answer.text)
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one ``error:`` line (and exit code 2) like every other error."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m ovis_u1", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common = _Parser(add_help=False)
    common.add_argument("--model", help="Ovis-U1 checkpoint folder (default: $OVIS_U1_MODEL or models/ovis_u1/*)")
    common.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda if available)")
    common.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    common.add_argument("--attention", default="auto", choices=["auto", "sdpa", "flash_attn", "math"])
    common.add_argument("--weight-dtype", default="default", choices=list(WEIGHT_DTYPES),
                        help="storage of the LLM, visual encoder and MMDiT weights; fp8 halves their memory and "
                             "computes in --dtype, fp8_e4m3fn_scaled with a scale per matrix (closer to the "
                             "default's images); the VAE is never fp8")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", parents=[common], help="text-to-image → understanding → edit (smoke run without weights)")
    d.add_argument("--out", default="output", help="folder for the images (existing files are never overwritten)")
    d.add_argument("--smoke-dir", default=str(Path.home() / ".cache" / "ovis_u1" / "smoke-model"))

    t = sub.add_parser("t2i", parents=[common], help="text-to-image")
    t.add_argument("prompt")
    t.add_argument("--width", type=int, default=1024)
    t.add_argument("--height", type=int, default=1024)
    t.add_argument("--steps", type=int, default=50)
    t.add_argument("--txt-cfg", type=float, default=5.0)
    t.add_argument("--seed", type=int, default=42)
    t.add_argument("--out", default="output/ovis_u1_t2i.png")

    e = sub.add_parser("edit", parents=[common], help="edit an image from an instruction")
    e.add_argument("image")
    e.add_argument("instruction")
    e.add_argument("--steps", type=int, default=50)
    e.add_argument("--img-cfg", type=float, default=1.5)
    e.add_argument("--txt-cfg", type=float, default=6.0)
    e.add_argument("--seed", type=int, default=42)
    e.add_argument("--context-seed", type=int, default=None)
    e.add_argument("--out", default="output/ovis_u1_edit.png")

    u = sub.add_parser("understand", parents=[common], help="answer a question about images (or chat without)")
    u.add_argument("question")
    u.add_argument("images", nargs="*")
    u.add_argument("--max-new-tokens", type=int, default=1024)
    u.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    u.add_argument("--temperature", type=float, default=1.0)
    u.add_argument("--top-p", type=float, default=1.0)
    u.add_argument("--seed", type=int, default=0)
    u.add_argument("--instruction", default=None,
                   help="system prompt: how to answer, e.g. 'Rewrite the prompt as one detailed paragraph.'")

    s = sub.add_parser("smoke-model", help="write the small random-weight Ovis-U1 to a folder")
    s.add_argument("directory")

    q = sub.add_parser("quantize", help="write a GGUF folder (quantized LLM, visual encoder and MMDiT) of a model")
    q.add_argument("model_dir", help="Ovis-U1 checkpoint folder (safetensors)")
    q.add_argument("out_dir", help="new folder for the GGUF model (must not exist or be empty)")
    q.add_argument("--type", default="Q8_0", choices=list(QUANT_TYPES),
                   help="block type of the quantized matrices (README, 'Smaller weights')")
    return p


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 2 any error (one ``error:`` line on stderr, no traceback), 130 interrupted (Ctrl-C; no
    partial file is left). ``OVIS_U1_DEBUG=1`` shows the traceback of an unexpected error."""
    try:
        args = parser().parse_args(argv)
    except SystemExit as e:  # usage errors (already printed as one line) and --help
        return e.code if isinstance(e.code, int) else 2
    try:
        if args.command == "demo":
            return run_demo(args)
        if args.command == "smoke-model":
            print(build_smoke_model(args.directory))
            return 0
        if args.command == "quantize":
            print(quantize(args.model_dir, args.out_dir, args.type))
            return 0
        return run_task(args)
    except KeyboardInterrupt:
        print("\ninterrupted: no partial file was written (images finished before Ctrl-C are kept)", file=sys.stderr)
        return 130
    except (CheckpointError, OvisU1InputError, UsageError, FileNotFoundError) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # never a traceback for the user; the message still says what failed
        if os.environ.get("OVIS_U1_DEBUG"):
            raise
        print(f"error: {type(e).__name__}: {_one_line(e)} (unexpected; rerun with OVIS_U1_DEBUG=1 for details "
              "and report it)", file=sys.stderr)
        return 2


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split("\n")) if str(e) else type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
