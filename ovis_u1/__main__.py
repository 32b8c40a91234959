"""Headless Ovis-U1: ``python -m ovis_u1 {demo,t2i,edit,understand,smoke-model}``.

The model folder comes from ``--model``, else ``$OVIS_U1_MODEL``, else the first Ovis-U1 folder under a ComfyUI
``models/ovis_u1/`` (``$OVIS_U1_MODELS_DIR``, ``./models/ovis_u1``, or the ComfyUI this pack is installed in).
``demo`` runs text-to-image → understanding → edit; without a model it builds a small random-weight Ovis-U1 and
says loudly that this is a smoke run (noise images, nonsense text).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .checkpoint import default_model_roots, find_model_dirs


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
        "Download it with\n  huggingface-cli download AIDC-AI/Ovis-U1-3B --local-dir models/ovis_u1/Ovis-U1-3B\n"
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


def save_image(image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path = fresh_path(path)
    image.save(path)
    return path


def step_printer(label: str):
    start = time.time()

    def report(step: int, total: int, *_):
        print(f"\r{label}: step {step}/{total} ({time.time() - start:.1f}s)", end="\n" if step == total else "",
              flush=True)

    return report


def _load(args, path: Path):
    import torch

    from . import load_model

    dtype = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    print(f"loading {path} ...", flush=True)
    return load_model(path, device=args.device, dtype=dtype, attention=args.attention)


def run_demo(args) -> int:
    from PIL import Image

    from .smoke import build_smoke_model, is_smoke_model

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
    from PIL import Image

    path = resolve_model(args.model)
    if path is None:
        print("error: " + no_model_message(), file=sys.stderr)
        return 2
    model = _load(args, path)
    if args.command == "t2i":
        image = model.text_to_image(args.prompt, width=args.width, height=args.height, steps=args.steps,
                                    txt_cfg=args.txt_cfg, seed=args.seed, callback=step_printer("text-to-image"))
        print(save_image(image, Path(args.out)))
    elif args.command == "edit":
        image = model.edit(Image.open(args.image), args.instruction, steps=args.steps, img_cfg=args.img_cfg,
                           txt_cfg=args.txt_cfg, seed=args.seed, context_seed=args.context_seed,
                           callback=step_printer("edit"))
        print(save_image(image, Path(args.out)))
    else:
        images = [Image.open(p) for p in args.images]
        answer = model.understand(images, args.question, max_new_tokens=args.max_new_tokens,
                                  do_sample=args.temperature > 0 and args.sample, temperature=args.temperature,
                                  top_p=args.top_p, seed=args.seed)
        print(answer.text)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ovis_u1", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", help="Ovis-U1 checkpoint folder (default: $OVIS_U1_MODEL or models/ovis_u1/*)")
    common.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda if available)")
    common.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    common.add_argument("--attention", default="auto", choices=["auto", "sdpa", "flash_attn", "math"])
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

    s = sub.add_parser("smoke-model", help="write the small random-weight Ovis-U1 to a folder")
    s.add_argument("directory")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from . import CheckpointError, OvisU1InputError

    try:
        if args.command == "demo":
            return run_demo(args)
        if args.command == "smoke-model":
            from .smoke import build_smoke_model

            print(build_smoke_model(args.directory))
            return 0
        return run_task(args)
    except (CheckpointError, OvisU1InputError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
