"""Memory benchmark of Ovis-U1 per part and per job, for default and fp8 weight storage (not a test; asserts nothing).

For a checkpoint folder, every row runs in its own subprocess (so its peak RSS is its own) and reports:

* ``weights``  -- bytes of the parameters and buffers resident for that row (tied tensors counted once): the part
  itself for a part row, the whole model for a job row;
* ``act peak`` -- peak activation bytes: on CPU, every tensor storage an operator creates while the row runs is
  counted from its creation until its last tensor is freed (a ``TorchDispatchMode`` sees every aten op; weakref
  finalizers see the frees; storages that existed before the row -- the weights -- are never counted). Transient
  copies count too, e.g. the bf16 copy a manual-cast layer makes of an fp8 weight. On CUDA it is
  ``torch.cuda.max_memory_allocated`` minus the bytes allocated before the row;
* ``RSS load`` / ``RSS run`` -- the process's peak resident set (VmHWM) during loading and while running: the
  kernel's high-water mark is reset (``/proc/self/clear_refs``) after the load and after the inputs of a part row are
  made and the other parts dropped (freed memory handed back with ``malloc_trim`` first, so RSS shows what is
  live rather than what glibc keeps), so ``RSS run`` is the peak of the row's own work (weights resident included;
  measured on a first, untracked run, which also gives ``run s``; the activation peak comes from a second run under
  the tracker, whose bookkeeping would otherwise show in RSS and time); both are relative to the RSS
  right after importing torch, ovis_u1 and transformers' Qwen3 (the code, not the weights).

Rows: parts, each as it runs inside a t2i job at --size (``llm+vision``: encode_condition; ``mmdit+refiner``: refine
+ sample; ``vae``: decode), the other parts are dropped before it runs; jobs (``t2i``, ``edit``, ``understand``):
the whole pipeline with the whole model resident.

Storage: ``default`` (weights in --dtype) and ``fp8_e4m3fn`` / ``fp8_e5m2`` (``load_model(weight_dtype=...)``:
LLM/vision/MMDiT matrices in fp8, compute in --dtype, the VAE in fp32 always).

``--quality`` instead measures what fp8 storage costs: max |Δ| of the final latent and of the uint8 image of t2i and
edit, fp8 weights against --dtype weights, compute in --dtype; as a yardstick, the row "bf16 vs fp32" gives what
--dtype itself costs against an fp32 model.

Hook for partial loading: ``LOADERS`` maps a ``--load`` name to ``loader(checkpoint, device, dtype, storage) ->
model``. ``full`` is ``ovis_u1.load_model``; ``random`` takes a config.json in place of CHECKPOINT and makes random
weights on the device (the full-size rows on a GPU: ``--load random ../shared/golden/full_size/config.json``); ComfyUI's partial loading (a ModelPatcher with a weight
budget) belongs to ``nodes/comfy_bridge.py`` and registers itself with ``register_loader("partial", ...)`` in a
script that imports ComfyUI, then calls ``main()``.

    python bench/bench_memory.py CHECKPOINT [--size 256] [--steps 4] [--storage default,fp8_e4m3fn] [--json P]
    python bench/bench_memory.py CHECKPOINT --quality [--size 256] [--steps 4]
    python bench/bench_memory.py ../shared/golden/full_size/config.json --load random --device cuda --size 1024 \
        --steps 50 --rows t2i,edit,understand --storage default,fp8_e4m3fn
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
import weakref
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PARTS = ("llm+vision", "mmdit+refiner", "vae")
JOBS = ("t2i", "edit", "understand")
PART_MODULES = {"llm+vision": ("llm", "visual_tokenizer", "vte"), "mmdit+refiner": ("visual_generator.backbone",),
                "vae": ("visual_generator.vae",)}
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


# ---------------------------------------------------------------------------------------------------------------------
# Loaders (the hook for partial loading)
# ---------------------------------------------------------------------------------------------------------------------

def _load_full(checkpoint, device, dtype, storage):
    import ovis_u1

    return ovis_u1.load_model(checkpoint, device=device, dtype=dtype, weight_dtype=storage)


def _load_random(config_path, device, dtype, storage):
    """The architecture of ``config_path`` (a config.json, e.g. ../shared/golden/full_size/config.json) with random
    weights made directly on ``device`` in the dtypes ``load_model`` would give them (no checkpoint on disk; the
    smoke tokenizer and preprocessor). For the full-size rows on a GPU."""
    import tempfile

    import torch
    from torch import nn

    from ovis_u1 import prompts
    from ovis_u1.config import params_from_dicts
    from ovis_u1.llm import finish_llm
    from ovis_u1.model import OvisU1, fp8_keys
    from ovis_u1.operations import manual_cast, parse_weight_dtype
    from ovis_u1.smoke import PREPROCESSOR, write_tokenizer

    weight_dtype = parse_weight_dtype(storage)
    folder = Path(tempfile.mkdtemp(prefix="ovis_u1_tok_"))
    write_tokenizer(folder)
    params = params_from_dicts(json.loads(Path(config_path).read_text()), PREPROCESSOR)
    with torch.device("meta"):
        model = OvisU1(params, tokenizer=prompts.load_tokenizer(folder),
                       operations=manual_cast if weight_dtype is not None else nn)
    in_fp8 = fp8_keys(model) if weight_dtype is not None else set()
    generator = torch.Generator(device=device).manual_seed(0)
    for name, module in model.named_modules():
        for pname, p in list(module._parameters.items()):
            if p is None or name + "." + pname == "llm.lm_head.weight":
                continue
            key = f"{name}.{pname}" if name else pname
            target = torch.float32 if key.startswith("visual_generator.vae.") else dtype
            t = torch.randn(p.shape, generator=generator, device=device, dtype=torch.float32)
            if p.dim() > 1:
                t.mul_(1.0 / max(1, p[0].numel()) ** 0.5)
            else:  # norm weights near 1, biases near 0
                t.mul_(0.05).add_(1.0) if pname in ("weight", "scale") else t.mul_(0.02)
            t = t.to(weight_dtype if key in in_fp8 else target)
            module._parameters[pname] = nn.Parameter(t, requires_grad=False)
    for module in model.modules():
        if isinstance(module, manual_cast.Embedding):
            module.compute_dtype = dtype
    finish_llm(model.llm, torch.device(device))
    model.eval()
    return model


LOADERS = {"full": _load_full, "random": _load_random}


def register_loader(name: str, loader) -> None:
    """Add a way of loading (e.g. ComfyUI's partial load); rows then run with ``--load NAME``."""
    LOADERS[name] = loader


# ---------------------------------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------------------------------

def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap memory back to the OS (glibc ``malloc_trim``).

    Without it, tensors freed after loading (dropped parts, dtype conversions) stay in the RSS: glibc raises its mmap
    threshold after the first large free, so later large tensors come from the heap, which it does not shrink.
    """
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux ≥ 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss() -> int:
    return _status_kib("VmHWM") * 1024


def current_rss() -> int:
    return _status_kib("VmRSS") * 1024


class ActivationPeak:
    """Peak bytes of tensor storages created by aten ops inside the ``with`` block (CPU), see the module docstring."""

    def __init__(self):
        import torch

        self.torch = torch
        self.cuda = False
        self.current = self.peak = 0
        self.live: dict[int, list[int]] = {}  # storage data_ptr → [nbytes, live tensors]
        self.seen: set[int] = set()  # ids of tensor objects already counted
        self.before: set[int] = set()

    def start(self, model, device) -> "ActivationPeak":
        torch = self.torch
        self.cuda = torch.device(device).type == "cuda"
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        for t in list(model.parameters()) + list(model.buffers()):
            self.before.add(t.untyped_storage().data_ptr())
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in torch.utils._pytree.tree_leaves(out):
                    if isinstance(t, torch.Tensor):
                        tracker.track(t)
                return out

        self.mode = Mode()
        self.mode.__enter__()
        return self

    def track(self, t) -> None:
        if t.device.type == "meta" or id(t) in self.seen:
            return
        storage = t.untyped_storage()
        ptr, size = storage.data_ptr(), storage.nbytes()
        if ptr == 0 or ptr in self.before:
            return
        entry = self.live.get(ptr)
        if entry is None:
            entry = self.live[ptr] = [size, 0]
            self.current += size
            self.peak = max(self.peak, self.current)
        entry[1] += 1
        self.seen.add(id(t))
        weakref.finalize(t, self._free, ptr, id(t))

    def _free(self, ptr: int, tid: int) -> None:
        self.seen.discard(tid)
        entry = self.live.get(ptr)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[ptr]

    def stop(self) -> int:
        if self.cuda:
            self.torch.cuda.synchronize()
            return self.torch.cuda.max_memory_allocated() - self.base
        self.mode.__exit__(None, None, None)
        return self.peak


def resident_bytes(module) -> int:
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        key = (t.device, t.untyped_storage().data_ptr())
        if key not in seen and t.device.type != "meta":
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def _submodule(model, dotted: str):
    for name in dotted.split("."):
        model = getattr(model, name)
    return model


def _drop(model, dotted: str) -> None:
    *parents, name = dotted.split(".")
    owner = model
    for p in parents:
        owner = getattr(owner, p)
    delattr(owner, name)


# ---------------------------------------------------------------------------------------------------------------------
# One row (runs in its own process)
# ---------------------------------------------------------------------------------------------------------------------

def edit_source(size: int):
    from PIL import Image

    import numpy as np

    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


def run_row(args) -> dict:
    import torch

    import ovis_u1  # noqa: F401 — imported before the baseline, like transformers' Qwen3 below
    from transformers import Qwen3ForCausalLM  # noqa: F401

    dtype = getattr(torch, DTYPES[args.dtype])
    storage = None if args.storage == "default" else args.storage
    torch.manual_seed(0)
    gc.collect()
    base = current_rss()
    start = time.perf_counter()
    model = LOADERS[args.load](args.checkpoint, args.device, dtype, storage)
    load_s = time.perf_counter() - start
    rss_load = peak_rss() - base
    release_freed_memory()
    rss_loaded = current_rss() - base
    size, steps, row = args.size, args.steps, args.row
    prompt = "a cute cat"

    if row in PARTS:
        # Inputs of the part come from the other parts; then only this part stays resident.
        if row != "llm+vision":
            condition = model.encode_condition(prompt, "t2i", width=size, height=size)
        if row == "vae":
            latent = model.sample(model.refine(condition), size, size, steps=1)
        for keep_out in PARTS:
            if keep_out != row:
                for dotted in PART_MODULES[keep_out]:
                    _drop(model, dotted)
        gc.collect()
        weights = sum(resident_bytes(_submodule(model, d)) for d in PART_MODULES[row])
        work = {
            "llm+vision": lambda: model.encode_condition(prompt, "t2i", width=size, height=size),
            "mmdit+refiner": lambda: model.sample(model.refine(condition), size, size, steps=steps),
            "vae": lambda: model.vae_decode(latent),
        }[row]
    else:
        weights = resident_bytes(model)
        source = edit_source(size)
        work = {
            "t2i": lambda: model.text_to_image(prompt, size, size, steps=steps),
            "edit": lambda: model.edit(source, "add a hat", steps=steps),
            "understand": lambda: model.understand([source], "What is it?", max_new_tokens=args.max_new_tokens),
        }[row]
    # First run: time and peak RSS, untracked. Second run: the activation peak (the tracker's own bookkeeping
    # would otherwise show in the RSS and the time).
    release_freed_memory()
    rss_before_run = current_rss()
    reset_peak_rss()
    start = time.perf_counter()
    with torch.inference_mode():
        work()
    run_s = time.perf_counter() - start
    rss_run, rss_run_above = peak_rss() - base, peak_rss() - rss_before_run
    gc.collect()
    meter = ActivationPeak().start(model, args.device)
    with torch.inference_mode():
        work()
    act = meter.stop()
    return {
        "row": row, "storage": args.storage, "load": args.load, "weights": weights, "act_peak": act,
        "rss_load": rss_load, "rss_loaded": rss_loaded, "rss_run": rss_run, "rss_run_above_start": rss_run_above,
        "load_s": load_s, "run_s": run_s,
    }


# ---------------------------------------------------------------------------------------------------------------------
# fp8 quality (--quality)
# ---------------------------------------------------------------------------------------------------------------------

def quality(args) -> list[dict]:
    import numpy as np
    import torch

    import ovis_u1

    dtype = getattr(torch, DTYPES[args.dtype])
    results: dict[str, dict] = {}
    storages = ["default"] + [s for s in args.storage.split(",") if s != "default"]
    if args.dtype != "fp32":  # the yardstick: what --dtype itself costs against fp32 weights and compute
        storages.append("fp32 model")
    for storage in storages:
        model = ovis_u1.load_model(args.checkpoint, device=args.device,
                                   dtype=torch.float32 if storage == "fp32 model" else dtype,
                                   weight_dtype=None if storage in ("default", "fp32 model") else storage)
        out = {}
        size = args.size
        refined = model.refine(model.encode_condition("a cute cat", "t2i", width=size, height=size))
        latent = model.sample(refined, size, size, steps=args.steps, seed=42)
        out["t2i"] = (latent, np.asarray(model.decode_to_pil(latent)[0]))
        source = edit_source(size)
        refined = model.refine(model.encode_condition("add a hat", "edit", image=source))
        context = model.encode_context(source, seed=42)
        latent = model.sample(refined, context=context, steps=args.steps, seed=42)
        out["edit"] = (latent, np.asarray(model.decode_to_pil(latent)[0]))
        results[storage] = out
        del model
        gc.collect()
    rows = []
    for storage, out in results.items():
        if storage == "default":
            continue
        for job, (latent, image) in out.items():
            ref_latent, ref_image = results["default"][job]
            if storage == "fp32 model":  # rows read "<storage> against the default": here the default against fp32
                storage, latent, image, ref_latent, ref_image = (f"{args.dtype} vs fp32", ref_latent, ref_image,
                                                                 latent, image)
            dl = (latent - ref_latent).abs()
            di = np.abs(image.astype(np.int32) - ref_image.astype(np.int32))
            rows.append({
                "job": job, "storage": storage, "latent_max": dl.max().item(), "latent_mean": dl.mean().item(),
                "latent_ref_absmax": ref_latent.abs().max().item(), "image_max": int(di.max()),
                "image_mean": float(di.mean()),
            })
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------------------

def _mib(n: int) -> str:
    return f"{n / 2**20:9.1f}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--storage", default="default,fp8_e4m3fn", help="comma list of default/fp8_e4m3fn/fp8_e5m2")
    parser.add_argument("--load", default="full", help=f"loader name ({', '.join(LOADERS)})")
    parser.add_argument("--rows", default=",".join(PARTS + JOBS))
    parser.add_argument("--quality", action="store_true", help="measure the fp8 deviations instead of memory")
    parser.add_argument("--json", help="write the rows to this file")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one row in this process
    args = parser.parse_args(argv)

    if args.quality:
        rows = quality(args)
        print(f"{'job':5} {'storage':11} {'max|Δ| latent':>14} {'mean|Δ|':>9} {'max|latent|':>11} "
              f"{'max|Δ| uint8':>12} {'mean|Δ| uint8':>13}")
        for r in rows:
            print(f"{r['job']:5} {r['storage']:11} {r['latent_max']:14.4g} {r['latent_mean']:9.3g} "
                  f"{r['latent_ref_absmax']:11.3g} {r['image_max']:12d} {r['image_mean']:13.3f}")
    elif args.row:
        print("ROW " + json.dumps(run_row(args)))
        return
    else:
        rows = []
        passthrough = ["--size", str(args.size), "--steps", str(args.steps), "--max-new-tokens",
                       str(args.max_new_tokens), "--dtype", args.dtype, "--device", args.device, "--load", args.load]
        print(f"{args.checkpoint}: {args.size}x{args.size}, {args.steps} steps, compute {args.dtype}, "
              f"load {args.load}, device {args.device}; MiB")
        print(f"{'row':14} {'storage':11} {'weights':>9} {'act peak':>9} {'RSS load':>9} {'RSS run':>9} "
              f"{'load s':>7} {'run s':>7}")
        for storage in args.storage.split(","):
            for row in args.rows.split(","):
                cmd = [sys.executable, __file__, args.checkpoint, "--row", row, "--storage", storage, *passthrough]
                done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
                line = next((l for l in done.stdout.splitlines() if l.startswith("ROW ")), None)
                if line is None:
                    print(f"{row:14} {storage:11} failed: {done.stderr.strip().splitlines()[-1:]}")
                    continue
                r = json.loads(line[4:])
                rows.append(r)
                print(f"{row:14} {storage:11} {_mib(r['weights'])} {_mib(r['act_peak'])} {_mib(r['rss_load'])} "
                      f"{_mib(r['rss_run'])} {r['load_s']:7.2f} {r['run_s']:7.2f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
