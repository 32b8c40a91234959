"""ComfyUI rows of the memory benchmark: each part of a loaded Ovis-U1 under ComfyUI's model management (CPU).

The parts are the loader's three outputs: the encoder's LLM + visual encoder (``encoder.patcher``), the MMDiT (the
core MODEL) and the VAE (the core VAE's patcher). Per part and per way of loading (full; partial at a weight budget of
--budget × the part; fp8 weight storage, full), in ComfyUI's own accounting: the part's weight bytes
(``patcher.model_size()``), the bytes ComfyUI reports as loaded (``model_loaded_weight_memory``) and whether it marked
the part lowvram; the activation estimate ComfyUI gets for a 1024² request (Encode Condition's
``condition_request_memory``, the core MODEL's ``memory_required`` for cond + uncond, the core VAE's
``memory_used_decode``); and the wall time of one representative pass (condition, 4 guided MMDiT steps at --size, one
VAE decode at --size). Peak RSS of the process at the end.

    COMFYUI_PATH=~/.cache/comfy-0.18.1/ComfyUI ~/.cache/comfy-0.18.1/venv/bin/python bench/bench_comfyui.py \
        --model /path/to/an/ovis_u1/checkpoint [--budget 0.2] [--size 256] [--json out.json]

On a CPU ComfyUI never loads partially by itself; the partial rows call the patcher's lowvram path directly, as
``load_models_gpu`` does on a small GPU (see tests/comfyui/test_memory.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
PACK = "comfyui_ovis_u1_bench"


def comfy_pack(model_dir: Path):
    sys.path.insert(0, str(Path(os.environ["COMFYUI_PATH"]).expanduser().resolve()))
    from comfy.cli_args import args

    args.cpu = True
    import folder_paths

    folder = Path(tempfile.mkdtemp()) / "ovis_u1"
    folder.mkdir()
    (folder / "bench").symlink_to(model_dir.resolve())
    folder_paths.add_model_folder_path("ovis_u1", str(folder))
    spec = importlib.util.spec_from_file_location(PACK, ROOT / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK] = module
    spec.loader.exec_module(module)
    return module


def run_pass(ovis, part: str, size: int):
    import torch

    with torch.inference_mode():
        if part == "llm":
            return ovis.encode_condition("a red fox in fresh snow", "t2i", width=size, height=size)
        if part == "mmdit":
            condition = ovis.encode_condition("a red fox in fresh snow", "t2i", width=size, height=size)
            return ovis.sample(ovis.refine(condition), size, size, steps=4)
        return ovis.vae_decode(torch.zeros(1, ovis.params.vae.latent_channels, size // 8, size // 8))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--budget", type=float, default=0.2)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--json", type=Path)
    a = parser.parse_args()
    from tests.pack import node_classes  # before ComfyUI's folder, which has a tests package too, joins sys.path

    pack = comfy_pack(a.model)
    import comfy.model_management as mm

    estimates = sys.modules[f"{PACK}.ovis_u1.estimates"]
    loader = node_classes(pack)["OvisU1ModelLoader"]
    rows = []
    for mode in ("full", "partial", "fp8"):
        encoder, model, vae = loader.execute("bench", dtype="bf16", attention="auto",
                                             weight_dtype="fp8_e4m3fn" if mode == "fp8" else "default").args
        patchers = {"llm": encoder.patcher, "mmdit": model, "vae": vae.patcher}
        activation = {
            "llm": estimates.condition_request_memory(encoder.params, "t2i", 1024, 1024,
                                                      estimates.dtype_bytes(encoder.dtype), encoder.attention),
            "mmdit": model.model.memory_required([2, 4, 128, 128]),
            "vae": vae.memory_used_decode((1, 4, 128, 128), vae.vae_dtype),
        }
        for part in ("llm", "mmdit", "vae"):
            patcher = patchers[part]
            size = patcher.model_size()
            if mode == "partial":
                patcher.patch_model(device_to=patcher.load_device, lowvram_model_memory=int(size * a.budget),
                                    load_weights=True)
            else:
                mm.load_models_gpu([patcher])
            start = time.perf_counter()
            run_pass(encoder.model, part, a.size)
            seconds = time.perf_counter() - start
            rows.append(dict(mode=mode, part=part, weight_mb=size / 2**20,
                             loaded_mb=patcher.model.model_loaded_weight_memory / 2**20,
                             lowvram=bool(getattr(patcher.model, "model_lowvram", False)),
                             activation_estimate_mb=activation[part] / 2**20, seconds=seconds))
            if mode == "partial":
                patcher.unpatch_model(patcher.offload_device)
        mm.unload_all_models()
        del encoder, model, vae, patchers
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    print(f"{'mode':8} {'part':6} {'weights MB':>11} {'loaded MB':>10} {'lowvram':>8} {'act. est. MB':>13} {'s/pass':>7}")
    for r in rows:
        print(f"{r['mode']:8} {r['part']:6} {r['weight_mb']:11.1f} {r['loaded_mb']:10.1f} {str(r['lowvram']):>8} "
              f"{r['activation_estimate_mb']:13.1f} {r['seconds']:7.2f}")
    print(f"peak RSS {peak:.0f} MB")
    if a.json:
        a.json.write_text(json.dumps({"rows": rows, "peak_rss_mb": peak}, indent=2))


if __name__ == "__main__":
    main()
