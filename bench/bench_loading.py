"""Loading benchmark: peak memory and seconds of ``load_model`` on the mid checkpoint, next to reading the file once.

Every measurement runs in its own process. Per row it reports the RSS right after ``import torch``, the peak RSS
while loading above it (the kernel's high-water mark, reset after the imports through /proc/self/clear_refs), the
resident weight bytes (distinct tensors of the loaded model, in the dtypes they end up in), that peak as a multiple
of the weight bytes, the seconds of ``load_model``, and the RSS after one pass over every weight (memory-mapped
weights only come in when first used). ``read`` rows time reading the whole file once in 16 MiB pieces, as
``cat file > /dev/null`` does. ``cold`` rows first drop the file from the page cache (posix_fadvise DONTNEED),
``warm`` rows read it once beforehand. Each load process first loads the tiny smoke model, so imports and
first-call costs are not counted as loading. The ``bf16 floor`` row is a lower bound for any loader that ends with
bf16 weights resident: fresh memory of the bf16 weights' size filled by converting from a small cached fp32 buffer,
with no file read at all (the kernel faults in and zeroes fresh memory page by page). The measurements run in rounds
(read twice, then a load as bf16; again before the load as fp32 and the floor), so drift hits them alike. Rows are best of all runs (wall seconds; "cpu s" is the process's user+sys
time meanwhile); "÷read" is the median over rounds of the row's seconds over the fastest read of the same round.

    python bench/bench_loading.py CACHE_DIR                  # builds CACHE_DIR/ovis_u1_mid first if needed
    python bench/bench_loading.py CACHE_DIR --root /work/main --repeat 3 --json out.json

``--root`` loads with the ``ovis_u1`` of another checkout (e.g. to compare with an older loader).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHUNK = 16 << 20


def rss_bytes(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def drop_from_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def read_once(path: Path) -> float:
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as fh:
        buf = bytearray(CHUNK)
        while fh.readinto(buf):
            pass
    return time.perf_counter() - start


def prepare_cache(path: Path, cache: str) -> None:
    if cache == "cold":
        drop_from_page_cache(path)
    else:
        read_once(path)


# ------------------------------------------------------------------------------------------ worker processes
def worker_read(args) -> dict:
    path = Path(args.path) / "model.safetensors"
    prepare_cache(path, args.cache)
    cpu = cpu_seconds()
    seconds = read_once(path)
    return {"seconds": seconds, "cpu_seconds": cpu_seconds() - cpu, "file_bytes": path.stat().st_size}


def worker_floor(args) -> dict:
    """A lower bound for any loader that ends with the weights resident as bf16: only the writing side of the
    conversion, i.e. fresh bf16 memory of the model's size (which the kernel faults in and zeroes page by page)
    filled by converting from one small fp32 buffer that stays in the CPU's cache. Reading the file is left out."""
    import torch

    path = Path(args.path) / "model.safetensors"
    with open(path, "rb") as fh:
        header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
    counts = [math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__"]
    source = torch.randn(4 << 20)  # 16 MiB of fp32
    cpu, start = cpu_seconds(), time.perf_counter()
    out = []
    for count in counts:
        tensor = torch.empty(count, dtype=torch.bfloat16)
        for first in range(0, count, source.numel()):
            n = min(source.numel(), count - first)
            tensor[first : first + n].copy_(source[:n])
        out.append(tensor)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "cpu_seconds": cpu_seconds() - cpu, "file_bytes": path.stat().st_size,
            "weight_bytes": sum(t.nbytes for t in out)}


def worker_load(args) -> dict:
    import torch

    rss_torch = rss_bytes()
    sys.path.insert(0, args.root)
    from ovis_u1.model import load_model

    # Warm-up on the tiny smoke model: imports and first-call costs (transformers' tokenizer machinery, torch's
    # meta-device paths) are paid once per process, not per checkpoint, so they are not counted as loading.
    load_model(Path(args.path).parent / "smoke", device="cpu", dtype=torch.bfloat16)

    path = Path(args.path)
    prepare_cache(path / "model.safetensors", args.cache)
    rss_before = rss_bytes()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    start, cpu = time.perf_counter(), cpu_seconds()
    model = load_model(path, device="cpu", dtype={"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype])
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    peak = rss_bytes("VmHWM")
    tensors = {t.untyped_storage().data_ptr(): t for t in [*model.parameters(), *model.buffers()]}
    weight_bytes = sum(t.untyped_storage().nbytes() for t in tensors.values())
    with torch.no_grad():
        for t in tensors.values():
            t.float().sum()
    return {
        "rss_after_import_torch": rss_torch, "rss_before_load": rss_before, "peak_rss": peak,
        "peak_above_torch": peak - rss_torch, "weight_bytes": weight_bytes,
        "peak_over_weights": (peak - rss_torch) / weight_bytes, "seconds": seconds, "cpu_seconds": cpu,
        "rss_after_touch_above_torch": rss_bytes() - rss_torch,
        "file_bytes": (path / "model.safetensors").stat().st_size,
    }


def run_json(cmd: list[str]) -> dict:
    """The JSON object a worker process ``cmd`` prints on its last line (its stderr in the error if it fails)."""
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_worker(kind: str, path: Path, root: str, dtype: str = "", cache: str = "cold") -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--path", str(path), "--root", root, "--cache", cache]
    if dtype:
        cmd += ["--dtype", dtype]
    return run_json(cmd)


# ------------------------------------------------------------------------------------------------- report
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cache_dir", nargs="?", help="where the mid checkpoint is (built if missing)")
    parser.add_argument("--root", default=str(ROOT), help="checkout whose ovis_u1 loads the checkpoint")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--caches", default="cold,warm")
    parser.add_argument("--json")
    parser.add_argument("--worker", choices=["read", "load", "floor"], help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], help=argparse.SUPPRESS)
    parser.add_argument("--cache", choices=["cold", "warm"], default="cold", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps({"read": worker_read, "load": worker_load, "floor": worker_floor}[args.worker](args)))
        return
    if not args.cache_dir:
        parser.error("CACHE_DIR is required")

    sys.path.insert(0, str(ROOT / "bench"))
    from mid_checkpoint import build_mid_checkpoint

    path = build_mid_checkpoint(args.cache_dir)
    if not (Path(args.cache_dir) / "smoke" / "config.json").is_file():
        from ovis_u1.smoke import build_smoke_model

        build_smoke_model(Path(args.cache_dir) / "smoke")
    gib = 1 << 30
    rows = []
    kinds = (("read", ""), ("load", "bf16"), ("load", "fp32"), ("floor", "bf16"))
    for cache in args.caches.split(","):
        # Rounds interleave the measurements, so a drift of the machine (or the disk) hits them alike, and each load
        # is compared with the reads of its own round. The file is read twice right before each load and the faster
        # read counts: on a VM, a cold read right after a process that freed much memory (a load) can take 2-3× as
        # long, so this favours reading.
        rounds = []
        for _ in range(args.repeat):
            measured: dict = {}
            for kind, dtype in kinds[1:]:
                reads = [run_worker("read", path, args.root, "", cache) for _ in range(2)]
                measured.setdefault(("read", ""), []).extend(reads)
                measured[(kind, dtype)] = [run_worker(kind, path, args.root, dtype, cache)]
            rounds.append(measured)
        for kind, dtype in kinds:
            runs = [run for r in rounds for run in r[(kind, dtype)]]
            best = dict(min(runs, key=lambda r: r["seconds"]))
            best["peak_rss_max"] = max(r.get("peak_rss", 0) for r in runs)
            ratios = sorted(min(x["seconds"] for x in r[(kind, dtype)]) / min(x["seconds"] for x in r[("read", "")])
                            for r in rounds)
            best["over_read"] = ratios[len(ratios) // 2]
            what = {"read": "read file once", "floor": "bf16 floor"}.get(kind, f"load fp32→{dtype}")
            rows.append({"what": what, "cache": cache, **best})
    print(f"checkpoint {path} ({rows[0]['file_bytes'] / gib:.2f} GiB fp32), loader from {args.root}")
    print(f"{'what':<16} {'cache':<5} {'s':>6} {'s/GiB':>6} {'÷read':>6} {'cpu s':>6} {'torch RSS':>9} "
          f"{'peak-torch':>10} {'weights':>8} {'ratio':>5} {'touched':>8}")
    for r in rows:
        per_gib = r["seconds"] / (r["file_bytes"] / gib)
        if "peak_rss" in r:
            mem = (f"{r['rss_after_import_torch'] / gib:>8.2f}G {r['peak_above_torch'] / gib:>9.2f}G "
                   f"{r['weight_bytes'] / gib:>7.2f}G {r['peak_over_weights']:>5.2f} "
                   f"{r['rss_after_touch_above_torch'] / gib:>7.2f}G")
        else:
            mem = ""
        print(f"{r['what']:<16} {r['cache']:<5} {r['seconds']:>6.2f} {per_gib:>6.2f} {r['over_read']:>6.2f} "
              f"{r['cpu_seconds']:>6.2f} {mem}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
