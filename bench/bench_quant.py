"""Smaller weights side by side (not a test): each weight storage / GGUF type against bf16 weights, on a checkpoint
folder (the mid-size random one of ``mid_checkpoint.py``), computed in bf16 on the CPU.

Every row runs in its own subprocess (its peak RSS is its own). A row is a weight storage of the loader
(``fp8_e4m3fn``, ``fp8_e4m3fn_scaled`` …: the checkpoint quantized at load) or a GGUF type (``Q8_0``, ``Q5_1``,
``Q4_1`` …: the folder converted first by ``python -m ovis_u1 quantize`` into --work, reused when there); the
reference row ``bf16`` is the checkpoint loaded in bf16. Per row:

* t2i and edit |Δ| mean / max: uint8 levels from the reference's image (256², 4 steps, one prompt, one edit of a
  fixed gradient image);
* understanding: of 8 fixed questions (about the gradient image), how many give the reference's greedy tokens
  (--tokens each), and the first position where any differs;
* weight MB: the bytes of the LLM, visual encoder and MMDiT as loaded (tied tensors once; the VAE is fp32 in every
  row and left out); file MB: the row's weight files on disk (fp8 rows read the checkpoint itself: "—");
* load s, peak RSS MB, s/step (the median t2i step);
* 3.6B MB: the same weights of the real Ovis-U1-3B in that format, computed from its key/shape list
  (--manifest: tests/fixtures/golden/full_size/state_dict_shapes.json) with the loader's and the converter's rules.

A storage name this checkout does not know is skipped with a note. Random weights are not real ones: the figures
say how the formats compare, not how a trained model's pictures change.

    python bench/bench_quant.py /tmp/ovis_mid/ovis_u1_mid --work /tmp/gguf_mid \
        [--rows bf16,fp8_e4m3fn,fp8_e4m3fn_scaled,Q8_0,Q5_1,Q4_1] [--json out.json [--fresh]]

Each row's result is kept in --work/ROW.json and reused by later runs (e.g. one that adds a storage after a merge);
rows may run in parallel (``--worker ROW`` alone measures one; a run waits for a row another process measures).
--fresh measures every row again.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import ovis_u1  # noqa: E402
from ovis_u1 import gguf as g  # noqa: E402
from ovis_u1.config import load_params  # noqa: E402
from ovis_u1.model import OvisU1, fp8_keys  # noqa: E402
from ovis_u1.operations import manual_cast, parse_weight_dtype  # noqa: E402
from ovis_u1.quantize import TYPES, layer_matrices, quantize, target_type  # noqa: E402

REFERENCE = "bf16"
ROWS = "bf16,fp8_e4m3fn,fp8_e4m3fn_scaled,Q8_0,Q5_1,Q4_1"
MANIFEST = ROOT / "tests" / "fixtures" / "golden" / "full_size"
SIZE, STEPS = 256, 4
PROMPT = "a red fox in the snow, watercolor"
INSTRUCTION = "make the sky purple"
QUESTIONS = ["What is in this image?", "Describe the colors.", "Is it day or night?", "How many objects are there?",
             "What is on the left?", "Write a title for it.", "What style is this?", "Where could this be?"]


def gradient(size: int = SIZE) -> Image.Image:
    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    return Image.fromarray((np.stack([x, y, 1 - x * y], -1) * 255).astype(np.uint8))


# ----------------------------------------------------------------------------------------------------- worker
def weight_bytes(model) -> int:
    """Bytes of the LLM, visual encoder, visual table and MMDiT (distinct storages)."""
    seen = {}
    for part in (model.llm, model.visual_tokenizer, model.vte, model.mmdit):
        for t in [*part.parameters(), *part.buffers()]:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def worker(row: str, folder: Path, out: Path) -> dict:
    torch.manual_seed(0)
    start = time.perf_counter()
    storage = {} if row == REFERENCE or row in TYPES else {"weight_dtype": row}
    model = ovis_u1.load_model(folder, device="cpu", dtype=torch.bfloat16, **storage)
    load_s = time.perf_counter() - start
    stamps = []
    t2i = model.text_to_image(PROMPT, SIZE, SIZE, steps=STEPS, seed=1,
                              callback=lambda *a: stamps.append(time.perf_counter()))
    edit = model.edit(gradient(), INSTRUCTION, steps=STEPS, seed=1)
    tokens = [model.understand([gradient()], q, max_new_tokens=ARGS.tokens).token_ids for q in QUESTIONS]
    np.save(out / f"{row}_t2i.npy", np.array(t2i))
    np.save(out / f"{row}_edit.npy", np.array(edit))
    files = sorted(folder.glob("*.gguf")) + [folder / g.VAE_NAME] if row in TYPES else []
    return {"row": row, "load_s": load_s, "weight_bytes": weight_bytes(model),
            "file_bytes": sum(f.stat().st_size for f in files) or None,
            "s_per_step": statistics.median(np.diff(stamps)) if len(stamps) > 1 else None,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "tokens": tokens}


# -------------------------------------------------------------------------------------------- 3.6B column
def full_size_bytes(manifest: Path) -> dict[str, int]:
    """Bytes of the LLM, visual encoder, table and MMDiT of the real model per row: bf16 reference, fp8 (the loader's
    fp8_keys in one byte, plus one fp32 scale per scaled matrix), GGUF types (the converter's target_type, the kept
    tensors in the checkpoint's bf16)."""
    params = load_params(manifest)
    shapes = {k: tuple(s) for k, s in json.loads((manifest / "state_dict_shapes.json").read_text())["shapes"].items()
              if not k.startswith(g.VAE_PREFIX)}
    with torch.device("meta"):
        cast_model = OvisU1(params, operations=manual_cast)
    fp8 = fp8_keys(cast_model, {k: s for k, s in shapes.items()})
    matrices = layer_matrices(params)
    numel = {k: int(np.prod(s)) for k, s in shapes.items()}
    out = {REFERENCE: 2 * sum(numel.values())}
    out["fp8_e4m3fn"] = sum(numel[k] * (1 if k in fp8 else 2) for k in shapes)
    out["fp8_e4m3fn_scaled"] = out["fp8_e4m3fn"] + 4 * len(fp8)
    for name, qtype in TYPES.items():
        total = 0
        for k, s in shapes.items():
            t = target_type(k, s, torch.bfloat16, qtype, matrices)
            values, nbytes = g.BLOCKS[t]
            total += numel[k] // values * nbytes
        out[name] = total
    return out


# ------------------------------------------------------------------------------------------------- report
def known_storage(row: str) -> bool:
    try:
        parse_weight_dtype(row)
        return True
    except ovis_u1.OvisU1InputError:
        return False


def compare(ref_dir: Path, row: str, ref: dict, res: dict) -> dict:
    out = {}
    for task in ("t2i", "edit"):
        a = np.load(ref_dir / f"{row}_{task}.npy").astype(np.int32)
        b = np.load(ref_dir / f"{REFERENCE}_{task}.npy").astype(np.int32)
        d = np.abs(a - b)
        out[task] = (float(d.mean()), int(d.max()))
    same = [x == y for x, y in zip(res["tokens"], ref["tokens"])]
    first = [next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
             for x, y, s in zip(res["tokens"], ref["tokens"], same) if not s]
    out["understand"] = (sum(same), min(first) if first else None)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--work", type=Path, required=True, help="GGUF folders and images (made when missing)")
    parser.add_argument("--rows", default=ROWS)
    parser.add_argument("--manifest", type=Path, default=MANIFEST)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--json", type=Path, help="write every result here; rows already in it are reused")
    parser.add_argument("--fresh", action="store_true", help="measure every row again")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    global ARGS
    ARGS = parser.parse_args()
    ARGS.work.mkdir(parents=True, exist_ok=True)
    if ARGS.worker:  # one row; its result is kept in --work (a row already measured there is not run again)
        saved, running = ARGS.work / f"{ARGS.worker}.json", ARGS.work / f"{ARGS.worker}.running"
        while running.exists() and not saved.is_file():  # another process measures this row now (rows in parallel)
            time.sleep(5)
        if ARGS.fresh or not saved.is_file():
            folder = ARGS.work / ARGS.worker if ARGS.worker in TYPES else ARGS.checkpoint
            running.touch()
            try:
                saved.write_text(json.dumps(worker(ARGS.worker, folder, ARGS.work)))
            finally:
                running.unlink(missing_ok=True)
        print(saved.read_text())
        return
    results, notes = {}, []
    if ARGS.json and ARGS.json.is_file() and not ARGS.fresh:  # rows measured before (their images are in --work)
        results = json.loads(ARGS.json.read_text())["rows"]
    for row in ARGS.rows.split(","):
        if row in results:
            continue
        if row not in TYPES and row != REFERENCE and not known_storage(row):
            notes.append(f"{row}: not a weight storage of this checkout — skipped")
            continue
        if row in TYPES and not (ARGS.work / row / g.GGUF_NAME).is_file():
            quantize(ARGS.checkpoint, ARGS.work / row, row, progress=False)
        cmd = [sys.executable, __file__, str(ARGS.checkpoint), "--work", str(ARGS.work), "--worker", row,
               "--tokens", str(ARGS.tokens), *(["--fresh"] if ARGS.fresh else [])]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"row {row} failed:\n{done.stderr}")
        results[row] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{row}: done", file=sys.stderr, flush=True)
    full = full_size_bytes(ARGS.manifest)
    ref = results[REFERENCE]
    mb = 2**20
    print("| row | t2i \\|Δ\\| mean / max | edit \\|Δ\\| mean / max | understanding: same / 8, first diff | "
          "weight MB | file MB | load s | peak RSS MB | s/step | 3.6B MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row, res in [(r, results[r]) for r in ARGS.rows.split(",") if r in results]:
        c = compare(ARGS.work, row, ref, res)
        first = "—" if c["understand"][1] is None else str(c["understand"][1])
        file_mb = "—" if res["file_bytes"] is None else f"{res['file_bytes'] / mb:.0f}"
        print(f"| {row} | {c['t2i'][0]:.2f} / {c['t2i'][1]} | {c['edit'][0]:.2f} / {c['edit'][1]} | "
              f"{c['understand'][0]}, {first} | {res['weight_bytes'] / mb:.0f} | {file_mb} | {res['load_s']:.1f} | "
              f"{res['peak_rss'] / mb:.0f} | {res['s_per_step']:.2f} | {full.get(row, 0) / mb:.0f} |")
        res["compare"] = c
    for note in notes:
        print(f"\n{note}")
    if ARGS.json:
        ARGS.json.write_text(json.dumps({"rows": results, "full_size_bytes": full, "notes": notes}, indent=1))


if __name__ == "__main__":
    main()
