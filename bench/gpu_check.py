"""GPU check: the full-size Ovis-U1 under ComfyUI's own model management with Dynamic VRAM, on an NVIDIA GPU.

One command prints one table: 1024² text-to-image and edit at 50 steps and understanding with 512 new tokens, in bf16,
fp8_e4m3fn storage, fp8 with ``--fast fp8_matrix_mult``, under a 6 GB VRAM budget (``--reserve-vram`` of the card's
memory less 6 GiB), with the pack's file-slice marks off (``OVIS_U1_FILE_SLICES=0``) and with core
TorchCompileModel — seconds per image (tokens/s for understanding), peak VRAM, peak RSS — beside the official A100
bf16 figures. It needs an NVIDIA GPU and stops at once with a message (exit status 2) where there is none.

    python bench/gpu_check.py --comfyui /path/to/ComfyUI-0.33.0                 # full-size architecture, random weights
    python bench/gpu_check.py --comfyui /path/to/ComfyUI-0.33.0 --model /path/to/Ovis-U1-3B    # the real weights

Run it with the Python of that ComfyUI (its requirements installed, comfy-aimdo among them). Without ``--model`` it
writes a random-weight checkpoint of the architecture in ``--config`` (default: the full-size config.json in
tests/fixtures/golden/full_size) — bf16 safetensors made on the GPU (7.2 GB), the smoke model's byte-level tokenizer
(every id it gives lies inside the full vocabulary) and preprocessor files — into ``--cache-dir`` and reuses it on
the next run. Its images are noise and its answers nonsense; only sizes and timings are real (and prompts are
about 4× as many tokens as the real tokenizer makes of them).

Every configuration runs in a fresh subprocess, because ComfyUI reads its flags once at import: the subprocess sets
them, imports ComfyUI as ``main.py`` starts it (``cuda_malloc`` first, then ``main``: logging, comfy-aimdo, Dynamic
VRAM), loads the pack as ComfyUI loads a custom node (``nodes.load_custom_node``) and calls the nodes as the executor
does, under ``torch.inference_mode()``: Ovis-U1 Model Loader, EmptyLatentImage / Ovis-U1 Edit Context Encoder,
Ovis-U1 Encode Condition, Ovis-U1 MMDiT Sampler, core VAEDecode; Ovis-U1 Understand. After a short warm-up (every
task at 1 step / 2 tokens, which loads the parts and, with TorchCompileModel, compiles) each task is timed once. It
prints one JSON line, which the parent collects. The whole check keeps to ``--budget-s`` (default 465 s, so it ends
within 8 minutes; the first run on an H100 spends about 30 s of it writing the random checkpoint); a configuration
or task that would not fit is reported as skipped, one that runs over is stopped and reported.

The columns: seconds of the task (understanding: of the whole Understand call; load + warm-up: the loader and the
warm-up runs), tokens/s (understanding: generated tokens over those seconds), peak VRAM (the device memory in use at
the task's peak, sampled every 5 ms: what nvidia-smi shows, the CUDA context, every loaded part and allocator pools
included) and peak RSS of the subprocess (VmHWM, reset before each task; load + warm-up: since ComfyUI was
imported).

An offline GPU machine needs: this repository; an unpacked ComfyUI 0.33.0; a Python environment with ComfyUI's
requirements.txt (CUDA torch ≥ 2.8, comfy-aimdo, comfy-kitchen, ...) and this pack's requirements.txt installed (e.g.
a virtual environment built on a machine with the same OS, Python and CUDA, or wheels fetched with ``pip download -r
requirements.txt -d wheels`` and installed with ``pip install --no-index --find-links wheels -r requirements.txt``);
gcc for TorchCompileModel's inductor; about 8 GB free under --cache-dir; and ``--model`` if the real weights should
be used. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "tests" / "fixtures" / "golden" / "full_size" / "config.json"
RESULT_MARK = "OVIS_U1_GPU_CHECK "  # the subprocess's result line starts with this
NO_GPU_STATUS = 2

SIZE = 1024
STEPS = 50
NEW_TOKENS = 512
BUDGET_GIB = 6
TIME_BUDGET_S = 465  # the issue asks for under 8 minutes on an H100; the last subprocess is stopped at the budget
SEED = 42
T2I_PROMPT = "a red fox sitting in fresh snow at golden hour"
EDIT_PROMPT = "make the sky purple"
QUESTION = "Describe this image in detail."
MODEL_NAME = "Ovis-U1-gpu-check"  # the model list entry the loader is given (a link to the checkpoint folder)

# Official Ovis-U1-3B figures on an A100 in bf16 (seconds, GB), printed beside every row of the task.
OFFICIAL_A100_BF16 = {"t2i": (8.41, 10.5), "edit": (18.89, 10.1), "understand": (3.57, 8.2)}
# What each task costs on an H100 with Dynamic VRAM (seconds, a generous guess): a task is skipped, not started,
# when the subprocess's time would not cover it.
TASK_ESTIMATE_S = {"t2i": 10, "edit": 20, "understand": 20}


# ---------------------------------------------------------------------------------------------------------------------
# The configurations
# ---------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Configuration:
    """One table block: ComfyUI flags, the loader's weight storage, what runs, and its estimated seconds on an H100
    (start, load, warm-up and tasks), by which the parent decides whether it still fits."""

    name: str
    estimate_s: float
    flags: tuple[str, ...] = ()
    weight_dtype: str = "default"
    tasks: tuple[str, ...] = ("t2i",)
    file_slices: bool = True
    compile: bool = False


def reserve_for_budget(total_vram_gib: float, budget_gib: float = BUDGET_GIB) -> str:
    """The ``--reserve-vram`` (GiB) that leaves ``budget_gib`` of the card to ComfyUI."""
    return f"{max(total_vram_gib - budget_gib, 0.0):.2f}"


def configurations(total_vram_gib: float) -> list[Configuration]:
    """The rows, most important first: later ones are skipped when the time budget runs out."""
    budget = ("--reserve-vram", reserve_for_budget(total_vram_gib))
    fp8 = "fp8_e4m3fn"
    return [
        Configuration("bf16", 60, tasks=("t2i", "edit", "understand")),
        Configuration(fp8, 65, weight_dtype=fp8, tasks=("t2i", "edit", "understand")),
        Configuration(f"{fp8} + --fast fp8_matrix_mult", 50, flags=("--fast", "fp8_matrix_mult"), weight_dtype=fp8,
                      tasks=("t2i", "edit")),
        Configuration(f"bf16, {BUDGET_GIB} GB budget", 60, flags=budget, tasks=("t2i", "edit")),
        Configuration("bf16, file slices off", 35, file_slices=False),
        Configuration(f"bf16, {BUDGET_GIB} GB budget, file slices off", 40, flags=budget, file_slices=False),
        Configuration("bf16 + TorchCompileModel", 120, compile=True),  # inductor compiles the MMDiT in the warm-up
    ]


# ---------------------------------------------------------------------------------------------------------------------
# Results and the table (pure)
# ---------------------------------------------------------------------------------------------------------------------

def result_line(result: dict) -> str:
    return RESULT_MARK + json.dumps(result, separators=(",", ":"))


def parse_result(stdout: str) -> dict | None:
    """The subprocess's result (its last line starting with ``RESULT_MARK``), or None when it printed none."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    return None


def _gib(value) -> str:
    return "-" if value is None else f"{value:.1f} GiB"


def _official(task: str) -> str:
    if task not in OFFICIAL_A100_BF16:
        return ""
    seconds, gb = OFFICIAL_A100_BF16[task]
    return f"{seconds:.2f} s / {gb:.1f} GB"


def outcome(record: dict) -> str:
    """What a configuration or task without figures has to say: its error, or why it was skipped."""
    return f"error: {record['error']}" if "error" in record else f"skipped: {record['skipped']}"


def task_label(record: dict) -> str:
    return f"understand ({NEW_TOKENS})" if record["task"] == "understand" else record["task"]


def table_rows(results: list[dict]) -> list[list[str]]:
    """One row per configuration and task: configuration, task, seconds, tokens/s, peak VRAM, peak RSS, official."""
    rows = []
    for result in results:
        name = result["configuration"]
        if result.get("dynamic_vram") is False:
            name += " [Dynamic VRAM off]"
        if "error" in result or "skipped" in result:
            rows.append([name, "-", outcome(result), "", "", "", ""])
        for record in result.get("tasks", []):
            label, official = task_label(record), _official(record["task"])
            if "error" in record or "skipped" in record:
                rows.append([name, label, outcome(record), "", "", "", official])
                continue
            tokens = record.get("tokens")
            rate = f"{tokens / record['seconds']:.1f}" if tokens and record["seconds"] > 0 else "-"
            if tokens is not None and tokens != NEW_TOKENS:
                rate += f" ({tokens} tok)"
            rows.append([name, label, f"{record['seconds']:.2f}", rate, _gib(record.get("vram_gib")),
                         _gib(record.get("rss_gib")), official])
    return rows


HEADER = ["configuration", "task", "seconds", "tokens/s", "peak VRAM", "peak RSS", "official A100 bf16"]


def render_table(results: list[dict], title: str) -> str:
    """The title and the rows as fixed-width text; an error or skip fills the cells after the task."""
    rows = table_rows(results)
    numeric = {2, 3, 4, 5}
    widths = [len(h) for h in HEADER]
    for row in rows:
        shown = row[:2] if row[2].startswith(("error:", "skipped:")) else row  # a message runs over the later columns
        widths = [max(w, len(cell)) for w, cell in zip(widths, shown)] + widths[len(shown):]
    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    lines = [title, line(HEADER)]
    for row in rows:
        message = row[2].startswith(("error:", "skipped:"))
        lines.append((line(row[:2]) + "  " + row[2] if message else line(row)).rstrip())
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# The parent: GPU check, checkpoint, one subprocess per configuration
# ---------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Gpu:
    name: str
    total_gib: float


def nvidia_gpu() -> tuple[Gpu | None, str]:
    """The first NVIDIA GPU as nvidia-smi lists it, or None and why not (no torch import: this runs first)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None, "nvidia-smi is not on PATH (no NVIDIA driver)"
    try:
        out = subprocess.run([smi, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"nvidia-smi failed: {e}"
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    if out.returncode != 0 or not lines:
        return None, f"nvidia-smi lists no GPU ({(out.stderr or out.stdout).strip() or f'exit {out.returncode}'})"
    name, mib = (part.strip() for part in lines[0].rsplit(",", 1))
    return Gpu(name, float(mib) / 1024), ""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfyui", type=Path, help="an unpacked ComfyUI 0.33.0 (the folder with main.py)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                        help="config.json of the architecture to build with random weights (default: %(default)s)")
    source.add_argument("--model", type=Path, help="a real Ovis-U1 checkpoint folder instead of random weights")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "ovis_u1_gpu_check",
                        help="where the random checkpoint and the subprocess logs go (default: %(default)s)")
    parser.add_argument("--budget-s", type=float, default=TIME_BUDGET_S,
                        help="seconds the whole check may take; rows that would not fit are skipped (default: "
                             "%(default)s)")
    parser.add_argument("--json", type=Path, help="also write the collected results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one configuration's subprocess: its spec as JSON
    parser.add_argument("--build", help=argparse.SUPPRESS)  # the checkpoint builder's subprocess: its spec as JSON
    return parser.parse_args(argv)


def fail(message: str, status: int = 1) -> int:
    print(f"gpu_check: {message}", file=sys.stderr)
    return status


def config_digest(config: Path) -> str:
    return hashlib.sha256(config.read_bytes()).hexdigest()[:12]


def checkpoint_dir(cache_dir: Path, config: Path) -> Path:
    return cache_dir / f"random_{config_digest(config)}"


def run_subprocess(flag: str, spec: dict, log: Path, timeout_s: float, env: dict | None = None):
    """This script with ``flag SPEC``; stderr goes to ``log``. Returns (stdout, returncode) — (partial stdout, None)
    when it ran past ``timeout_s``."""
    command = [sys.executable, str(Path(__file__).resolve()), flag, json.dumps(spec)]
    with open(log, "w") as err:
        try:
            out = subprocess.run(command, stdout=subprocess.PIPE, stderr=err, text=True, timeout=max(timeout_s, 1),
                                 env={**os.environ, **(env or {})}, cwd=ROOT)
        except subprocess.TimeoutExpired as e:
            stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            return stdout, None
    return out.stdout, out.returncode


def log_tail(log: Path, lines: int = 15) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.build:
        return build_checkpoint(json.loads(args.build))
    if args.child:
        return child(json.loads(args.child))
    gpu, why = nvidia_gpu()
    if gpu is None:
        return fail(f"no NVIDIA GPU: {why}. This check measures the branches ComfyUI takes on an NVIDIA GPU "
                    "(Dynamic VRAM, fp8 matmul, pinned memory); run it on a machine with one.", NO_GPU_STATUS)
    start = time.perf_counter()
    if args.comfyui is None or not (args.comfyui / "main.py").is_file():
        return fail(f"--comfyui {args.comfyui} is not an unpacked ComfyUI (no main.py there); give the ComfyUI 0.33.0 "
                    "folder")
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    logs = args.cache_dir / "logs"
    logs.mkdir(exist_ok=True)

    if args.model is not None:
        if not (args.model / "config.json").is_file():
            return fail(f"--model {args.model} has no config.json; give an Ovis-U1 checkpoint folder")
        model_dir = args.model.resolve()
    else:
        if not args.config.is_file():
            return fail(f"--config {args.config} does not exist")
        model_dir = checkpoint_dir(args.cache_dir, args.config)
        print(f"gpu_check: random checkpoint {model_dir}", file=sys.stderr)
        spec = {"config": str(args.config.resolve()), "out": str(model_dir)}
        _, status = run_subprocess("--build", spec, logs / "build.log", args.budget_s)
        if status != 0:
            build_log = logs / "build.log"
            return fail(f"building the random checkpoint failed (see {build_log}):\n{log_tail(build_log)}")

    results = []
    for config in configurations(gpu.total_gib):
        remaining = args.budget_s - (time.perf_counter() - start)
        if remaining < config.estimate_s:
            results.append({"configuration": config.name, "skipped": f"{remaining:.0f} s of the time budget left, "
                                                                     f"it needs about {config.estimate_s:.0f} s"})
            continue
        print(f"gpu_check: {config.name} ({remaining:.0f} s left)", file=sys.stderr)
        log = logs / f"{len(results):02d}.log"
        spec = {**asdict(config), "comfyui": str(args.comfyui.resolve()), "model_dir": str(model_dir),
                "cache_dir": str(args.cache_dir.resolve()), "time_limit_s": remaining - 15}
        env = {} if config.file_slices else {"OVIS_U1_FILE_SLICES": "0"}
        stdout, status = run_subprocess("--child", spec, log, remaining, env)
        result = parse_result(stdout)
        if result is None:
            why = "ran past the time budget" if status is None else f"exited with status {status}"
            result = {"configuration": config.name, "error": f"{why} without a result (log: {log})"}
            print(log_tail(log), file=sys.stderr)
        results.append(result)

    versions = sorted({r["comfyui"] for r in results if r.get("comfyui")})
    title = (f"Ovis-U1 GPU check: {gpu.name} ({gpu.total_gib:.1f} GiB), ComfyUI {', '.join(versions) or '?'}, "
             f"{'random weights of ' + str(args.config) if args.model is None else str(args.model)}; "
             f"{SIZE}x{SIZE}, {STEPS} steps, {NEW_TOKENS} new tokens; {time.perf_counter() - start:.0f} s")
    print(render_table(results, title))
    if args.json:
        args.json.write_text(json.dumps({"title": title, "results": results}, indent=1))
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# The checkpoint builder's subprocess
# ---------------------------------------------------------------------------------------------------------------------

COMPLETE = ".complete"


def build_checkpoint(spec: dict) -> int:
    """Write (or reuse) a random-weight checkpoint of ``spec['config']`` in ``spec['out']``: bf16 weights drawn on the
    GPU as the smoke model draws them (ovis_u1/smoke.py), its tokenizer and preprocessor files."""
    out, config_path = Path(spec["out"]), Path(spec["config"])
    if (out / COMPLETE).is_file():
        return 0
    sys.path.insert(0, str(ROOT))
    import torch
    from safetensors.torch import save_file

    from ovis_u1.checkpoint import TIED_KEYS
    from ovis_u1.config import params_from_dicts
    from ovis_u1.model import OvisU1
    from ovis_u1.smoke import PREPROCESSOR, _random_weight, write_tokenizer

    config = json.loads(config_path.read_text())
    with torch.device("meta"):
        model = OvisU1(params_from_dicts(config, PREPROCESSOR))
    shapes = {k: t.shape for k, t in model.state_dict().items() if k not in TIED_KEYS}
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    device = torch.device(spec.get("device", "cuda"))
    generator = torch.Generator(device).manual_seed(SEED)
    with torch.device(device):
        state = {k: _random_weight(k, shape, generator).to(torch.bfloat16).cpu() for k, shape in shapes.items()}
    save_file(state, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(config, indent=1))
    (out / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=1))
    write_tokenizer(out)
    size = (out / "model.safetensors").stat().st_size
    (out / COMPLETE).write_text(f"{size} bytes in {time.perf_counter() - started:.1f} s\n")
    print(f"gpu_check: wrote {size / 1e9:.1f} GB in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# One configuration's subprocess
# ---------------------------------------------------------------------------------------------------------------------

def import_comfyui(comfyui: str, flags: list[str]):
    """ComfyUI started as ``python main.py FLAGS`` starts it, without its server: the CUDA allocator choice
    (``cuda_malloc``, imported first by main.py), then ``main`` itself (logging, comfy-aimdo with the VRAM headroom,
    model management, Dynamic VRAM when comfy-aimdo initialises). Torch must not be imported before."""
    sys.argv = ["main.py", *flags]
    sys.path.insert(0, comfyui)
    import comfy.options

    comfy.options.enable_args_parsing()
    import cuda_malloc  # noqa: F401
    import main  # noqa: F401


def load_pack_as_custom_node():
    """The pack loaded by ComfyUI's own custom-node loader; returns ComfyUI's node table."""
    import asyncio

    import nodes

    if not asyncio.run(nodes.load_custom_node(str(ROOT))):
        raise RuntimeError(f"ComfyUI could not load {ROOT} as a custom node (see the log above)")
    return nodes.NODE_CLASS_MAPPINGS


def register_model(model_dir: Path, cache_dir: Path) -> None:
    """The checkpoint folder as ``MODEL_NAME`` in ComfyUI's ovis_u1 model list."""
    import folder_paths

    folder = cache_dir / "models_ovis_u1"
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / MODEL_NAME
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(model_dir, target_is_directory=True)
    folder_paths.add_model_folder_path("ovis_u1", str(folder))


def run_node(cls, **inputs):
    """A node's outputs, called as the executor calls it: a V3 node (the pack's, ComfyUI's newer ones) through its
    ``execute`` classmethod (an ``io.NodeOutput``), a classic one through its FUNCTION on an instance."""
    if hasattr(cls, "GET_SCHEMA"):
        return tuple(cls.execute(**inputs).args)
    return getattr(cls(), cls.FUNCTION)(**inputs)


class Probe:
    """Peak device memory (sampled every 5 ms in a thread) and peak RSS (VmHWM, reset through clear_refs) of this
    process, per task."""

    def __init__(self, torch):
        import threading

        self.torch = torch
        self.cuda = torch.cuda.is_available()
        self.peak = 0
        self.running = True
        if self.cuda:
            self.device = torch.cuda.current_device()
            threading.Thread(target=self._sample, daemon=True).start()

    def _used(self) -> int:
        free, total = self.torch.cuda.mem_get_info(self.device)
        return total - free

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self._used())
            time.sleep(0.005)

    def reset(self) -> None:
        self.peak = self._used() if self.cuda else 0
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux ≥ 4.0)
        except OSError:
            pass

    def read(self) -> dict:
        if self.cuda:
            self.torch.cuda.synchronize()
            self.peak = max(self.peak, self._used())
        return {"vram_gib": self.peak / 2**30 if self.cuda else None, "rss_gib": peak_rss() / 2**30}


def peak_rss() -> int:
    """VmHWM of this process in bytes (ru_maxrss where /proc is not there)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def source_picture(torch):
    """A smooth colour picture as a ComfyUI IMAGE [1, SIZE, SIZE, 3] in [0, 1]."""
    ramp = torch.linspace(0, 1, SIZE)
    y, x = torch.meshgrid(ramp, ramp, indexing="ij")
    return torch.stack([x, y, 0.5 + 0.5 * torch.sin(6.28 * x * y)], dim=-1)[None]


class Workflow:
    """The nodes of the three tasks, as a workflow wires them."""

    def __init__(self, mapping, core, encoder, model, vae, torch):
        self.node = mapping
        self.core = core
        self.encoder, self.model, self.vae = encoder, model, vae
        self.torch = torch
        self.image = source_picture(torch)
        self.tokens: list[int] = []
        ovis = encoder.model
        understand = ovis.understand

        def counting(*args, **kwargs):  # the number of generated tokens, which the node's text does not tell
            result = understand(*args, **kwargs)
            self.tokens.append(len(result.token_ids))
            return result

        ovis.understand = counting

    def sample(self, positive, negative, latent, steps, txt_cfg: float, img_cfg: float = 1.5, middle=None):
        (samples,) = run_node(self.node["OvisU1Sampler"], model=self.model, positive=positive, negative=negative,
                              latent=latent, seed=SEED, steps=steps, txt_cfg=txt_cfg, img_cfg=img_cfg,
                              timestep_shift="config", middle=middle)
        (image,) = run_node(self.core.VAEDecode, vae=self.vae, samples=samples)
        return image

    def t2i(self, steps: int):
        (latent,) = run_node(self.core.EmptyLatentImage, width=SIZE, height=SIZE, batch_size=1)
        positive, _, negative = run_node(self.node["OvisU1EncodeCondition"], encoder=self.encoder, prompt=T2I_PROMPT,
                                         mode="text-to-image", latent=latent)
        return self.sample(positive, negative, latent, steps, txt_cfg=5.0)

    def edit(self, steps: int):
        resized, context, latent = run_node(self.node["OvisU1EditContextEncoder"], vae=self.vae, image=self.image,
                                            seed=SEED)
        positive, middle, negative = run_node(self.node["OvisU1EncodeCondition"], encoder=self.encoder,
                                              prompt=EDIT_PROMPT, mode="edit", image=resized, context=context)
        return self.sample(positive, negative, latent, steps, txt_cfg=6.0, img_cfg=1.5, middle=middle)

    def understand(self, new_tokens: int):
        return run_node(self.node["OvisU1Understand"], encoder=self.encoder, question=QUESTION,
                        max_new_tokens=new_tokens, images={"image0": self.image}, sampling={"sampling": "greedy"})

    def run(self, task: str, warm_up: bool = False):
        if task == "understand":
            return self.understand(2 if warm_up else NEW_TOKENS)
        return getattr(self, task)(1 if warm_up else STEPS)


def child(spec: dict) -> int:
    """One configuration: prints its result line (tasks that ran, their errors, those skipped for time)."""
    started = time.perf_counter()
    result = {"configuration": spec["name"], "tasks": []}
    try:
        import_comfyui(spec["comfyui"], spec["flags"])
        import comfy.memory_management
        import comfy.model_management as mm
        import comfyui_version
        import nodes as core
        import torch

        result["comfyui"] = comfyui_version.__version__
        result["dynamic_vram"] = bool(getattr(comfy.memory_management, "aimdo_enabled", False))
        result["device"] = mm.get_torch_device_name(mm.get_torch_device())
        probe = Probe(torch)
        probe.reset()
        mapping = load_pack_as_custom_node()
        register_model(Path(spec["model_dir"]), Path(spec["cache_dir"]))
        with torch.inference_mode():
            load_started = time.perf_counter()
            encoder, model, vae = run_node(mapping["OvisU1ModelLoader"], model=MODEL_NAME, dtype="bf16",
                                           weight_dtype=spec["weight_dtype"])
            if spec["compile"]:
                import comfy_extras.nodes_torch_compile as compile_nodes

                (model,) = run_node(compile_nodes.TorchCompileModel, model=model, backend="inductor")
            flow = Workflow(mapping, core, encoder, model, vae, torch)
            for task in spec["tasks"]:
                mm.cleanup_models_gc()  # what the executor does before every prompt
                flow.run(task, warm_up=True)
            result["tasks"].append({"task": "load + warm-up", "seconds": time.perf_counter() - load_started,
                                    **probe.read()})
            for task in spec["tasks"]:
                left = spec["time_limit_s"] - (time.perf_counter() - started)
                if left < TASK_ESTIMATE_S[task]:
                    result["tasks"].append({"task": task, "skipped": f"{left:.0f} s of the time budget left"})
                    continue
                mm.cleanup_models_gc()
                probe.reset()
                flow.tokens.clear()
                task_started = time.perf_counter()
                try:
                    flow.run(task)
                    record = {"task": task, "seconds": time.perf_counter() - task_started, **probe.read()}
                    if task == "understand":
                        record["tokens"] = flow.tokens[-1]
                except Exception as e:  # one task failing (e.g. out of memory) leaves the others to run
                    record = {"task": task, "error": f"{type(e).__name__}: {e}"[:300]}
                result["tasks"].append(record)
        probe.running = False
    except Exception as e:
        import traceback

        traceback.print_exc()
        result["error"] = f"{type(e).__name__}: {e}"[:300]
        torch = sys.modules.get("torch")
        if torch is not None and not torch.cuda.is_available() and "--cpu" not in spec["flags"]:
            result["error"] = (f"this Python's torch {torch.__version__} cannot use the GPU (torch.cuda.is_available() "
                               "is False): run the check with a Python that has ComfyUI's requirements and a CUDA "
                               f"build of torch ({result['error']})")[:300]
    sys.__stdout__.write(result_line(result) + "\n")
    sys.__stdout__.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
