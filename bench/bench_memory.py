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
--dtype itself costs against an fp32 model. ``--storage`` takes ``fp8_e4m3fn`` / ``fp8_e5m2`` (weight-only: the
pack's manual cast), ``fp8_e4m3fn+fast`` (ComfyUI's fp8 matmul of ``--fast``, emulated on the CPU: see "ComfyUI's fp8
matmul" below) and, with ``+all``, every matrix in fp8 (the layers of ``ovis_u1.model.FP8_KEPT_OUT`` too, as before
they were kept out). ``--reference-cache FILE`` keeps the default run's outputs (a safetensors file) for later runs
with the same settings.

``--sensitivity`` says which layers' inputs do not survive the fp8 matmul: per layer type, over a bf16 t2i and edit
job, the largest |input|, the share of inputs clamped at ±448 and the relative error of x·Wᵀ with the input rounded
to e4m3 against with the weight rounded; then per group of layers (``LAYER_GROUPS``) the t2i deviation with only that
group's inputs rounded (weights bf16) against only its weights in e4m3fn. ``FP8_KEPT_OUT`` cites its result.

Hook for partial loading: ``LOADERS`` maps a ``--load`` name to ``loader(checkpoint, device, dtype, storage) ->
model``. ``full`` is ``ovis_u1.load_model``; ``random`` takes a config.json in place of CHECKPOINT and makes random
weights on the device (the full-size rows on a GPU: ``--load random Ovis-U1-3B/config.json``, the config of the
downloaded checkpoint). ComfyUI's own partial loading (the loader's parts under its model management, at a weight
budget) is measured by ``bench_comfyui.py``; a script that imports ComfyUI can also add a loader here with
``register_loader(name, ...)``, then call ``main()``.

    python bench/bench_memory.py CHECKPOINT [--size 256] [--steps 4] [--storage default,fp8_e4m3fn] [--json P]
    python bench/bench_memory.py CHECKPOINT --quality [--size 256] [--steps 4] \
        [--storage fp8_e4m3fn,fp8_e4m3fn+fast,fp8_e4m3fn+fast+all] [--no-yardstick] [--reference-cache FILE]
    python bench/bench_memory.py CHECKPOINT --sensitivity [--size 256] [--steps 4]
    python bench/bench_memory.py Ovis-U1-3B/config.json --load random --device cuda --size 1024 \
        --steps 50 --rows t2i,edit,understand --storage default,fp8_e4m3fn
"""

from __future__ import annotations

import argparse
import functools
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
    """The architecture of ``config_path`` (a config.json, e.g. Ovis-U1-3B/config.json) with random
    weights made directly on ``device`` in the dtypes ``load_model`` would give them (no checkpoint on disk; the
    smoke tokenizer and preprocessor). For the full-size rows on a GPU."""
    import tempfile

    import torch
    from torch import nn

    from ovis_u1 import prompts
    from ovis_u1.config import params_from_dicts
    from ovis_u1.model import OvisU1, fp8_keys
    from ovis_u1.operations import manual_cast, parse_weight_dtype
    from ovis_u1.smoke import PREPROCESSOR, write_tokenizer

    weight_dtype = parse_weight_dtype(storage)
    folder = Path(tempfile.mkdtemp(prefix="ovis_u1_tok_"))
    write_tokenizer(folder)
    params = params_from_dicts(json.loads(Path(config_path).read_text()), PREPROCESSOR)
    with torch.device("meta"):
        model = OvisU1(params, tokenizer=prompts.load_tokenizer(folder, params.llm_config["vocab_size"]),
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

FAST, ALL = "+fast", "+all"  # storage suffixes: the emulated --fast matmul; every matrix in fp8 (none kept out)


def storage_label(storage: str) -> str:
    return storage.replace(FAST, " --fast").replace(ALL, " (all fp8)")


def load_for_quality(checkpoint, storage: str, device, dtype):
    """The model a --quality row measures: ``default`` (weights in ``dtype``), ``fp32 model``, ``fp8_e4m3fn`` /
    ``fp8_e5m2`` (weight-only fp8: the pack's manual cast), with ``+fast`` the emulated ``--fast`` matmul (e4m3fn
    only), with ``+all`` every matrix in fp8, ``ovis_u1.model.FP8_KEPT_OUT`` included (as before those were kept out);
    e.g. ``fp8_e4m3fn+fast+all``."""
    import torch

    import ovis_u1
    from ovis_u1.operations import manual_cast

    if storage in ("default", "fp32 model"):
        return ovis_u1.load_model(checkpoint, device=device, dtype=torch.float32 if storage == "fp32 model" else dtype)
    weight_dtype, *suffixes = storage.split("+")
    fast, all_fp8 = "fast" in suffixes, "all" in suffixes
    if set(suffixes) - {"fast", "all"} or (fast and weight_dtype != "fp8_e4m3fn"):
        raise SystemExit(f"--storage {storage}: use fp8_e4m3fn or fp8_e5m2, optionally +all, and +fast only with "
                         "fp8_e4m3fn (ComfyUI's fp8 matmul takes only e4m3fn weights; e5m2 layers take the plain cast)")
    operations = fast_fp8_operations() if fast else None
    with fp8_keep_out(not all_fp8):  # the encoder parts never take the fp8 matmul (the bridge builds them so)
        return ovis_u1.load_model(checkpoint, device=device, dtype=dtype, weight_dtype=weight_dtype,
                                  operations=operations, encoder_operations=manual_cast if fast else None)


def run_t2i(model, size: int, steps: int, prompt: str = "a cute cat"):
    """(final latent, uint8 image) of a seeded t2i job, the --quality measurement."""
    import numpy as np

    refined = model.refine(model.encode_condition(prompt, "t2i", width=size, height=size))
    latent = model.sample(refined, size, size, steps=steps, seed=42)
    return latent, np.asarray(model.decode_to_pil(latent)[0])


def run_edit(model, size: int, steps: int):
    import numpy as np

    source = edit_source(size)
    refined = model.refine(model.encode_condition("add a hat", "edit", image=source))
    context = model.encode_context(source, seed=42)
    latent = model.sample(refined, context=context, steps=steps, seed=42)
    return latent, np.asarray(model.decode_to_pil(latent)[0])


def save_reference(path: Path, key: str, outputs: dict) -> None:
    """The default run's (latent, uint8 image) of every job as a safetensors file (no pickle), with ``key`` (the
    checkpoint, size, steps, dtype and device it was made with) in its metadata."""
    import torch
    from safetensors.torch import save_file

    tensors = {}
    for job, (latent, image) in outputs.items():
        tensors[f"{job}.latent"] = latent.detach().cpu().contiguous()
        tensors[f"{job}.image"] = torch.from_numpy(image.copy())
    save_file(tensors, str(path), metadata={"key": key})


def load_reference(path: Path, key: str) -> dict | None:
    """What :func:`save_reference` wrote, if ``path`` holds a run made with ``key``; else None."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        if (f.metadata() or {}).get("key") != key:
            return None
        jobs = sorted({name.rsplit(".", 1)[0] for name in f.keys()})
        return {job: (f.get_tensor(f"{job}.latent"), f.get_tensor(f"{job}.image").numpy()) for job in jobs}


def deviation(out, ref) -> dict:
    """|Δ| of a (latent, uint8 image) pair against a reference pair."""
    import numpy as np

    (latent, image), (ref_latent, ref_image) = out, ref
    dl = (latent - ref_latent.to(latent.device)).abs()
    di = np.abs(image.astype(np.int32) - ref_image.astype(np.int32))
    return {"latent_max": dl.max().item(), "latent_mean": dl.mean().item(),
            "latent_ref_absmax": ref_latent.abs().max().item(), "image_max": int(di.max()),
            "image_mean": float(di.mean())}


def quality(args) -> list[dict]:
    import torch

    dtype = getattr(torch, DTYPES[args.dtype])
    storages = ["default"] + [s for s in args.storage.split(",") if s != "default"]
    if args.dtype != "fp32" and not args.no_yardstick:  # what --dtype itself costs against fp32 weights and compute
        storages.append("fp32 model")
    jobs = {"t2i": run_t2i, "edit": run_edit}
    results: dict[str, dict] = {}
    cache = None
    if args.reference_cache:  # the default run is the same for every storage: measure it once per setting
        key = f"{Path(args.checkpoint).resolve()}|{args.size}|{args.steps}|{args.dtype}|{args.device}"
        cache = Path(args.reference_cache)
        cached = load_reference(cache, key)
        if cached is not None:
            results["default"] = cached
            storages.remove("default")
    for storage in storages:
        model = load_for_quality(args.checkpoint, storage, args.device, dtype)
        results[storage] = {job: run(model, args.size, args.steps) for job, run in jobs.items()}
        print(f"  {storage_label(storage)}: done", file=sys.stderr, flush=True)
        del model
        gc.collect()
        if storage == "default" and cache is not None:
            save_reference(cache, key, results["default"])
    rows = []
    for storage, out in results.items():
        if storage == "default":
            continue
        for job in jobs:
            if storage == "fp32 model":  # rows read "<storage> against the default": here the default against fp32
                label, dev = f"{args.dtype} vs fp32", deviation(results["default"][job], out[job])
            else:
                label, dev = storage_label(storage), deviation(out[job], results["default"][job])
            rows.append({"job": job, "storage": label, **dev})
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# ComfyUI's fp8 matmul (``--fast``), emulated on the CPU
# ---------------------------------------------------------------------------------------------------------------------
# With ``--fast`` (or ``fp8_optimizations``) on a GPU that computes in fp8, ``comfy.ops.pick_operations`` returns
# ``comfy.ops.fp8_ops``: its Linear, when the weight is stored in float8_e4m3fn and the input is 2-D or 3-D, runs
# ``comfy.ops.fp8_linear`` (ComfyUI 0.33.0, comfy/ops.py): it clamps the input to ±448 *in place*, casts it to
# float8_e4m3fn with scale 1 and multiplies it with the e4m3fn weight (scale 1) in ``torch._scaled_mm`` (comfy_kitchen's
# ``scaled_mm_v2``, ``use_fast_accum=False``: fp32 accumulation, the bias added, the result in the input's dtype; a
# shape ``_scaled_mm`` refuses falls back to ``F.linear`` on the dequantised operands, same values). Any other weight
# dtype (e5m2, or a layer kept out of fp8 storage) takes the plain manual cast.
#
# The emulation below does the same on the CPU: clamp in place, round the input through float8_e4m3fn, then multiply
# with both operands cast back to the compute dtype. Both casts to bf16 are exact (an e4m3 value has 4 significant bits,
# bf16 has 8, and its exponent range covers e4m3's), every product of two e4m3 values is exact in the fp32 accumulator,
# and the CPU bf16 matmul accumulates in fp32 and rounds once — so this equals ``torch._scaled_mm`` up to the order of
# the fp32 summation (tests/test_fp8_compute.py checks it against the CPU's own ``torch._scaled_mm``, bit for bit).

FP8_INPUT_LIMIT = 448.0  # torch.finfo(torch.float8_e4m3fn).max: what comfy.ops.fp8_linear clamps the input to


def fp8_input(x):
    """``x`` as comfy.ops.fp8_linear feeds it to the matmul: clamped to ±448 in place, rounded through e4m3fn."""
    import torch

    torch.clamp(x, min=-FP8_INPUT_LIMIT, max=FP8_INPUT_LIMIT, out=x)
    return x.to(torch.float8_e4m3fn).to(x.dtype)


@functools.lru_cache(maxsize=None)
def fast_fp8_operations():
    """The namespace (built once, on first use: the bench imports torch lazily)."""
    import torch
    import torch.nn.functional as F

    from ovis_u1.operations import cast_like, manual_cast

    class comfy_fast_fp8(manual_cast):  # noqa: N801 — a namespace, like comfy.ops.fp8_ops
        """The pack's manual cast whose Linear multiplies as ``comfy.ops.fp8_ops`` does (see above)."""

        class Linear(manual_cast.Linear):
            # None: as ComfyUI, the input goes through fp8 exactly when the weight is stored in e4m3fn. True/False
            # force it either way (the sensitivity analysis quantises one group's inputs with bf16 weights).
            input_fp8: bool | None = None

            def forward(self, x):
                fast = self.weight.dtype == torch.float8_e4m3fn if self.input_fp8 is None else self.input_fp8
                if not fast or x.ndim not in (2, 3):  # fp8_linear returns None for other ranks
                    return super().forward(x)
                flat = fp8_input(x.reshape(-1, x.shape[-1]))  # a view when it can be: the caller's x is clamped too
                out = F.linear(flat, cast_like(self.weight, flat), cast_like(self.bias, flat))
                return out.reshape(*x.shape[:-1], out.shape[-1])

    return comfy_fast_fp8


def fp8_keep_out(keep_out: bool = True):
    """A context: ``keep_out=False`` loads with ``ovis_u1.model.FP8_KEPT_OUT`` emptied (every matrix in fp8)."""
    import contextlib
    from unittest import mock

    from ovis_u1 import model as model_module

    return contextlib.nullcontext() if keep_out else mock.patch.object(model_module, "FP8_KEPT_OUT", ())


def load_fast_fp8(checkpoint, device="cpu", dtype=None, keep_out: bool = True):
    """``load_model`` with e4m3fn storage and the emulated ``--fast`` layers (bf16 compute unless ``dtype``)."""
    import torch

    storage = "fp8_e4m3fn" + FAST + ("" if keep_out else ALL)
    return load_for_quality(checkpoint, storage, device, dtype or torch.bfloat16)


# ---------------------------------------------------------------------------------------------------------------------
# Which layers' inputs do not survive the fp8 matmul (--sensitivity)
# ---------------------------------------------------------------------------------------------------------------------
# Groups of the Linear layers fp8 storage reaches (state-dict module names; first match wins).
LAYER_GROUPS = (
    ("llm", r"^llm\."),
    ("vision", r"^visual_tokenizer\."),
    ("refiner input_embedder", r"\.txt_in\.input_embedder$"),
    ("refiner c_embedder", r"\.txt_in\.c_embedder\."),
    ("refiner blocks", r"\.txt_in\.individual_token_refiner\."),
    ("mmdit img_in", r"\.backbone\.img_in$"),
    ("mmdit time_in/vector_in", r"\.backbone\.(time_in|vector_in)\."),
    ("mmdit modulation", r"(_mod\.lin|\.modulation\.lin|final_layer\.adaLN_modulation\.\d+)$"),
    ("mmdit double blocks", r"\.double_blocks\.\d+\."),
    ("mmdit single blocks", r"\.single_blocks\.\d+\.linear[12]$"),
    ("mmdit final linear", r"\.final_layer\.linear$"),
)


def layer_group(name: str) -> str:
    import re

    return next((group for group, pattern in LAYER_GROUPS if re.search(pattern, name)), "other")


def layer_type(name: str) -> str:
    """A module name with its block indices replaced by N (one row per kind of layer)."""
    import re

    return re.sub(r"\.\d+(?=\.|$)", ".N", name)


def fp8_linears(model) -> dict:
    """name → Linear for every Linear whose matrix fp8 storage would take, kept-out ones included."""
    from torch import nn

    from ovis_u1.model import fp8_keys

    with fp8_keep_out(False):
        keys = fp8_keys(model)
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and f"{name}.weight" in keys}


class InputProbe:
    """Per Linear, over every call of a reference (bf16) run: the largest |input|, the share of input values the fp8
    matmul clamps (|x| > 448) and the share in e4m3's subnormal range (0 < |x| < 2^-6), and the relative error of the
    product x·Wᵀ (bias left out) with the input rounded as the fp8 matmul rounds it against with the weight rounded to
    e4m3fn (weight-only fp8): ‖Δ‖ / ‖x·Wᵀ‖ over all calls. ``weights``: name → the e4m3fn matrix fp8 storage gives."""

    def __init__(self, layers: dict, weights: dict):
        import torch

        self.stats = {name: {"max": 0.0, "n": 0, "clamped": 0, "subnormal": 0, "ref": 0.0, "input": 0.0,
                             "weight": 0.0} for name in layers}
        self.handles = []
        tiny = torch.finfo(torch.float8_e4m3fn).smallest_normal
        for name, layer in layers.items():
            def probe(layer, args, name=name):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                w = layer.weight.detach().to(x.dtype)
                ref = x @ w.T
                qx = fp8_input(x.clone().to(args[0].dtype)).float()
                st = self.stats[name]
                st["max"] = max(st["max"], x.abs().max().item())
                st["n"] += x.numel()
                st["clamped"] += int((x.abs() > FP8_INPUT_LIMIT).sum())
                st["subnormal"] += int(((x != 0) & (x.abs() < tiny)).sum())
                st["ref"] += ref.square().sum().item()
                st["input"] += (qx @ w.T - ref).square().sum().item()
                st["weight"] += (x @ weights[name].float().T - ref).square().sum().item()

            self.handles.append(layer.register_forward_pre_hook(probe))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def rows(self) -> list[dict]:
        by_type: dict[str, dict] = {}
        for name, st in self.stats.items():
            t = by_type.setdefault(layer_type(name), {"type": layer_type(name), "group": layer_group(name),
                                                      "max": 0.0, "n": 0, "clamped": 0, "subnormal": 0, "ref": 0.0,
                                                      "input": 0.0, "weight": 0.0})
            t["max"] = max(t["max"], st["max"])
            for k in ("n", "clamped", "subnormal", "ref", "input", "weight"):
                t[k] += st[k]
        rows = []
        for t in by_type.values():
            if not t["n"]:
                continue
            ref = max(t["ref"], 1e-30)
            rows.append({"type": t["type"], "group": t["group"], "input_absmax": t["max"],
                         "clamped": t["clamped"] / t["n"], "subnormal": t["subnormal"] / t["n"],
                         "input_err": (t["input"] / ref) ** 0.5, "weight_err": (t["weight"] / ref) ** 0.5})
        return rows


def sensitivity(args) -> dict:
    """The layer types' input statistics (``InputProbe``, over a t2i and an edit job), then per group of layers
    (``LAYER_GROUPS``) the t2i deviation against bf16 weights with only that group's inputs rounded as the fp8 matmul
    rounds them (weights bf16) and with only that group's weights in e4m3fn (inputs untouched)."""
    import torch

    dtype = getattr(torch, DTYPES[args.dtype])
    fp8 = dict(load_fast_fp8(args.checkpoint, args.device, dtype, keep_out=False).named_modules())
    model = ovis_u1_with_fast_layers(args.checkpoint, args.device, dtype)
    layers = fp8_linears(model)
    weights = {name: fp8[name].weight for name in layers}  # the e4m3fn matrices weight-only fp8 stores
    del fp8
    gc.collect()

    probe = InputProbe(layers, weights)
    with torch.inference_mode():
        run_t2i(model, args.size, args.steps)
        run_edit(model, args.size, args.steps)
    probe.remove()
    result = {"types": probe.rows(), "groups": []}

    reference = run_t2i(model, args.size, args.steps)
    for group, _ in LAYER_GROUPS:
        members = {name: layer for name, layer in layers.items() if layer_group(name) == group}
        if not members:
            continue
        for layer in members.values():  # inputs through fp8, weights bf16
            layer.input_fp8 = True
        by_input = deviation(run_t2i(model, args.size, args.steps), reference)
        saved = {}
        for name, layer in members.items():  # weights e4m3fn, inputs untouched
            layer.input_fp8, saved[name] = False, layer.weight
            layer.weight = torch.nn.Parameter(weights[name], requires_grad=False)
        by_weight = deviation(run_t2i(model, args.size, args.steps), reference)
        for name, layer in members.items():
            layer.input_fp8, layer.weight = None, saved[name]
        result["groups"].append({"group": group, "layers": len(members), "input": by_input, "weight": by_weight,
                                 "input_costs_more": by_input["image_mean"] > by_weight["image_mean"]})
        print(f"  {group}: done", file=sys.stderr, flush=True)
    return result


def ovis_u1_with_fast_layers(checkpoint, device, dtype):
    """The model in ``dtype`` (no fp8 storage) built from the emulated namespace, so that each Linear's
    ``input_fp8`` can send its inputs through the fp8 rounding."""
    import ovis_u1

    return ovis_u1.load_model(checkpoint, device=device, dtype=dtype, operations=fast_fp8_operations())


def print_sensitivity(result: dict) -> None:
    print("Per layer type, over a t2i and an edit job (bf16 run): largest |input|, share of inputs clamped (>448) and "
          "subnormal in e4m3 (<2^-6), relative error of x·Wᵀ with the input in e4m3 vs with the weight in e4m3")
    print(f"{'layer type':78} {'max|x|':>9} {'clamped':>8} {'subnorm':>8} {'err in':>8} {'err w':>8} {'in/w':>6}")
    for r in result["types"]:
        ratio = r["input_err"] / max(r["weight_err"], 1e-30)
        print(f"{r['type']:78} {r['input_absmax']:9.3g} {r['clamped']:8.2%} {r['subnormal']:8.2%} "
              f"{r['input_err']:8.4f} {r['weight_err']:8.4f} {ratio:6.2f}")
    print("\nPer group, t2i against bf16 weights: only the group's inputs through fp8 (weights bf16) vs only its weights "
          "in e4m3fn")
    print(f"{'group':26} {'layers':>6} | {'input: mean|Δ| uint8':>20} {'max':>4} {'max|Δ| lat':>10} | "
          f"{'weight: mean|Δ| uint8':>21} {'max':>4} {'max|Δ| lat':>10} | input costs more")
    for g in result["groups"]:
        i, w = g["input"], g["weight"]
        print(f"{g['group']:26} {g['layers']:6d} | {i['image_mean']:20.3f} {i['image_max']:4d} {i['latent_max']:10.4g} "
              f"| {w['image_mean']:21.3f} {w['image_max']:4d} {w['latent_max']:10.4g} | "
              f"{'YES' if g['input_costs_more'] else 'no'}")


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
    parser.add_argument("--reference-cache", help="--quality: keep the default run's outputs in this file and reuse "
                                                  "them when checkpoint, size, steps, dtype and device match")
    parser.add_argument("--no-yardstick", action="store_true", help="--quality: leave out the bf16 vs fp32 row")
    parser.add_argument("--sensitivity", action="store_true",
                        help="per layer type and group: what the fp8 matmul's input rounding costs against the "
                             "weight rounding (emulated --fast)")
    parser.add_argument("--json", help="write the rows to this file")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one row in this process
    args = parser.parse_args(argv)

    if args.sensitivity:
        rows = sensitivity(args)
        print_sensitivity(rows)
    elif args.quality:
        rows = quality(args)
        print(f"{'job':5} {'storage':22} {'max|Δ| latent':>14} {'mean|Δ|':>9} {'max|latent|':>11} "
              f"{'max|Δ| uint8':>12} {'mean|Δ| uint8':>13}")
        for r in rows:
            print(f"{r['job']:5} {r['storage']:22} {r['latent_max']:14.4g} {r['latent_mean']:9.3g} "
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
