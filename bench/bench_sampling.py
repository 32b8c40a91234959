"""Speed/memory benchmark of the Ovis-U1 MMDiT sampler (not a test; prints a report, asserts nothing).

A mid-size random model is built without any checkpoint: the smoke config with the *full* MMDiT width (hidden 1536,
12 heads, axes_dim 16/56/56, vec_in_dim 1536) but fewer blocks (--depth / --single default 2 / 4 instead of 6 / 12);
the tiny LLM / vision / VAE are irrelevant here (only the MMDiT runs per step). For each dtype (fp32, bf16) and task
(t2i: cond + no_both; edit: cond + no_txt with context tokens, no_both without) at 256x256 (N = 256 noise tokens):

* optimized   -- ``ovis_u1.sampling.denoise`` as the pack runs it: refiner/prepare cached, compatible branches batched;
* unbatched   -- the same with ``batch=False`` (one forward per branch);
* official    -- the reference implementation's cost: refiner + ``prepare`` recomputed for every branch at every step,
                 one forward per branch (official modeling_yak.py: YakModel.denoise /
                 edit_denoise call the backbone once per branch, and YakTransformer.forward runs txt_in each time).

FLOPs per step are counted with ``torch.utils.flop_counter.FlopCounterMode`` around one step of a meta-device copy
of the model (counts depend on shapes only; equal to counting the CPU run, which costs a step; CPU SDPA is added
through a custom mapping since torch's registry lacks it), and the achieved FLOP/s is shown next to this machine's
matmul FLOP/s for the same dtype, measured in the same process on a linear shaped like the model's MLP input
(tokens x 1536 -> 6144). Every (dtype, task) runs in a fresh subprocess so ``ru_maxrss`` is that configuration's own
peak RSS. Timings: best of --steps interleaved steps per path; the CPU time other processes used meanwhile is
reported, since on a shared machine it makes the numbers noisy.

    cd /work/main && python bench/bench_sampling.py [--steps 3] [--dtypes fp32,bf16] [--tasks t2i,edit] [--json P]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TASKS = ("t2i", "edit")


# ---- model ---------------------------------------------------------------------------------------------------


def mid_config(args) -> dict:
    """smoke_config() with the full MMDiT width and ``args.depth`` / ``args.single`` blocks."""
    from ovis_u1.smoke import smoke_config

    config = smoke_config()
    llm_hidden = int(config["llm_config"]["hidden_size"])
    config["visual_generator_config"].update(
        hidden_size=1536, num_heads=12, axes_dim=[16, 56, 56], vec_in_dim=1536, mlp_ratio=4,
        context_in_dim=args.context_dim or 2 * llm_hidden, depth=args.depth, depth_single_blocks=args.single,
    )
    return config


def build_mmdit(args, dtype: torch.dtype):
    """The MMDiT of the mid-size config, random weights (std 0.02; norm scales 1, biases 0), built on meta first so
    only the ``dtype`` copy is ever allocated."""
    from ovis_u1.config import params_from_dicts
    from ovis_u1.mmdit import MMDiT

    params = params_from_dicts(mid_config(args))
    with torch.device("meta"):
        model = MMDiT(params.mmdit).to(dtype)
    model = model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("scale", "norm1.weight", "norm2.weight")):
                p.fill_(1.0)
            elif name.endswith("bias") or name.endswith("cls_token"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model.eval(), params.mmdit


# ---- measurement helpers -------------------------------------------------------------------------------------


def rss_mib() -> float:
    """Current RSS (MiB) from /proc/self/statm; NaN where unavailable."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return float("nan")


def peak_rss_mib() -> float:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 1024 if sys.platform != "darwin" else kib / 2**20  # macOS reports bytes


def cpu_busy_s() -> tuple[float, float]:
    """(CPU seconds all processes have been busy, CPU seconds of this process) -- their growth over an interval
    tells how much other load shared the machine. NaN where /proc/stat is unavailable."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    own = ru.ru_utime + ru.ru_stime
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK"), own
    except (OSError, ValueError, IndexError):
        return float("nan"), own


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    mapping = {}
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None:  # not in torch's registry: attention would count 0 on CPU
        mapping[cpu_sdpa] = sdpa_flop
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return counter.get_total_flops()


def matmul_flops_per_s(m: int, k: int, n: int, dtype: torch.dtype, repeats: int = 5) -> float:
    """Best-of-``repeats`` FLOP/s of x[m,k] @ W[n,k]^T (F.linear, as the model's layers call it)."""
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(m, k, generator=gen).to(dtype)
    w = torch.randn(n, k, generator=gen).to(dtype)
    torch.nn.functional.linear(a, w)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.nn.functional.linear(a, w)
        best = min(best, time.perf_counter() - t0)
    return 2 * m * k * n / best


# ---- one configuration (runs in its own process) -------------------------------------------------------------


def run_one(dtype_name: str, task: str, args) -> dict:
    from ovis_u1.sampling import denoise, flow_schedule, guide_edit, guide_t2i, pack_latents

    dtype = DTYPES[dtype_name]
    rss_start = rss_mib()
    model, p = build_mmdit(args, dtype)
    with torch.device("meta"):  # the same architecture for FLOP counting (counts are shape-only)
        meta_model = type(model)(p).to(dtype)
    weights_mib = sum(t.numel() * t.element_size() for t in model.parameters()) / 2**20
    rss_model = rss_mib()

    size = args.size
    n_tok = (size // 16) ** 2
    gen = torch.Generator().manual_seed(0)
    x0 = pack_latents(torch.randn(1, 4, size // 8, size // 8, generator=gen)).to(dtype)
    # LLM conditions as the real model gives them: the cond branch is longer (prompt) than no_txt/no_both, which
    # share "Generate an image." and the same number of visual tokens.
    cond_txt = torch.randn(1, args.cond_len, p.context_in_dim, generator=gen).to(dtype)
    uncond_txt = torch.randn(1, args.uncond_len, p.context_in_dim, generator=gen).to(dtype)
    context = torch.randn(1, n_tok, p.in_channels, generator=gen).to(dtype) if task == "edit" else None
    # (condition, with context) per branch, in the order guide_* expects
    if task == "t2i":
        spec = [(cond_txt, False), (uncond_txt, False)]
    else:
        spec = [(cond_txt, True), (uncond_txt, True), (uncond_txt, False)]

    def guide(preds):
        if task == "t2i":
            return guide_t2i(preds[0], preds[1], 5.0)
        return guide_edit(preds[0], preds[1], preds[2], 1.5, 6.0)

    def prepare_all(items=spec, mmdit=model):
        out = []
        for txt, with_ctx in items:
            ctx = context if with_ctx else None
            if txt.device != next(mmdit.parameters()).device:
                txt = torch.empty_like(txt, device="meta")
                ctx = None if ctx is None else torch.empty_like(ctx, device="meta")
            tokens, pooled = mmdit.refine(txt)
            out.append(mmdit.prepare(tokens, pooled, size, size, context=ctx))
        return out

    timesteps = flow_schedule(args.steps, n_tok, p.timestep_shift, p.base_shift, p.max_shift)
    res: dict = dict(dtype=dtype_name, task=task, branches=len(spec), threads=torch.get_num_threads())
    m = args.cond_len + n_tok * (2 if task == "edit" else 1)  # tokens of the longest branch
    mm_shape = (m, p.hidden_size, int(p.hidden_size * p.mlp_ratio))
    times: dict[str, list[float]] = {}
    matmul: list[float] = []

    with torch.inference_mode():
        branches = prepare_all()
        res["forwards_per_step"] = len({b.batch_key() for b in branches})
        paths = {
            # the pack's path: cached refiner/prepare, equal-length branches batched
            "opt": lambda t0, t1: denoise(model, x0, [t0, t1], branches, guide, batch=True),
            "unbatched": lambda t0, t1: denoise(model, x0, [t0, t1], branches, guide, batch=False),
            # the reference's cost: refiner + prepare for every branch at every step, one forward per branch
            "official": lambda t0, t1: denoise(model, x0, [t0, t1], prepare_all(), guide, batch=False),
        }
        if args.equal_len and args.uncond_len != args.cond_len:
            eq_branches = prepare_all([(cond_txt, c) for _, c in spec])
            paths["eq_batched"] = lambda t0, t1: denoise(model, x0, [t0, t1], eq_branches, guide, batch=True)
            paths["eq_unbatched"] = lambda t0, t1: denoise(model, x0, [t0, t1], eq_branches, guide, batch=False)

        # warm-up: one step of every distinct forward layout (oneDNN primitives, allocator)
        paths["opt"](timesteps[0], timesteps[1])
        if res["forwards_per_step"] != len(spec):
            paths["unbatched"](timesteps[0], timesteps[1])
        if "eq_batched" in paths:
            paths["eq_batched"](timesteps[0], timesteps[1])
        # timed: the paths interleaved step by step (order rotated each round) so background load hits them alike;
        # best and median per path
        busy0, own0, wall0 = *cpu_busy_s(), time.perf_counter()
        order = list(paths)
        for i, (t_curr, t_prev) in enumerate(zip(timesteps[:-1], timesteps[1:])):
            for name in order[i % len(order):] + order[: i % len(order)]:  # rotated: no path always goes first
                t0 = time.perf_counter()
                paths[name](t_curr, t_prev)
                times.setdefault(name, []).append(time.perf_counter() - t0)
            matmul.append(matmul_flops_per_s(*mm_shape, dtype, repeats=3))
        busy1, own1, wall1 = *cpu_busy_s(), time.perf_counter()
        res["other_load_cores"] = max(0.0, (busy1 - busy0) - (own1 - own0)) / (wall1 - wall0)

    with torch.inference_mode():
        mx = torch.empty_like(x0, device="meta")
        meta_branches = prepare_all(mmdit=meta_model)
        res["flop_step"] = count_flops(lambda: denoise(meta_model, mx, timesteps[:2], meta_branches, guide))
        res["flop_refine_prepare"] = count_flops(lambda: prepare_all(mmdit=meta_model))

    for name, ts in times.items():
        res[f"s_step_{name}"] = min(ts)
        res[f"s_step_{name}_median"] = sorted(ts)[len(ts) // 2]
        res[f"s_step_{name}_all"] = ts
    res["s_step"] = res["s_step_opt"]
    res["matmul_shape"] = "x".join(map(str, mm_shape))
    res["matmul_flops"] = max(matmul)
    res["matmul_flops_all"] = matmul
    res["achieved_flops"] = res["flop_step"] / res["s_step"]
    res["achieved_flops_official"] = (res["flop_step"] + res["flop_refine_prepare"]) / res["s_step_official"]
    res["weights_mib"] = weights_mib
    res["rss_start_mib"] = rss_start
    res["rss_model_mib"] = rss_model
    res["peak_rss_mib"] = peak_rss_mib()
    return res


# ---- driver --------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32,bf16 (default both)")
    ap.add_argument("--tasks", default="t2i,edit", help="comma list of t2i,edit (default both)")
    ap.add_argument("--steps", type=int, default=3, help="timed denoising steps per path (default 3)")
    ap.add_argument("--size", type=int, default=256, help="square image size in pixels (default 256 -> 256 tokens)")
    ap.add_argument("--depth", type=int, default=2, help="double-stream blocks (full model: 6)")
    ap.add_argument("--single", type=int, default=4, help="single-stream blocks (full model: 12)")
    ap.add_argument("--cond-len", type=int, default=300, help="text tokens of the cond branch (default 300)")
    ap.add_argument("--uncond-len", type=int, default=280, help="text tokens of the no_txt/no_both branches (280)")
    ap.add_argument("--context-dim", type=int, default=0, help="LLM condition width (default 2 x smoke LLM hidden)")
    ap.add_argument("--equal-len", action="store_true",
                    help="also time all branches at --cond-len (what batching gives when lengths match)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ap.add_argument("--json", metavar="PATH", help="also write all results as JSON")
    ap.add_argument("--one", nargs=2, metavar=("DTYPE", "TASK"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.steps < 1:
        ap.error("--steps must be at least 1")
    if args.size % 16:
        ap.error("--size must be a multiple of 16")
    return args


def child_argv(args, dtype: str, task: str) -> list[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--one", dtype, task, "--steps", str(args.steps),
            "--size", str(args.size), "--depth", str(args.depth), "--single", str(args.single),
            "--cond-len", str(args.cond_len), "--uncond-len", str(args.uncond_len),
            "--context-dim", str(args.context_dim), "--threads", str(args.threads)]
    return argv + (["--equal-len"] if args.equal_len else [])


def fmt_table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def report(results: list[dict], args) -> str:
    g = 1e9
    main = [[r["task"], r["dtype"], str(r["branches"]), str(r["forwards_per_step"]), f"{r['s_step']:.3f}",
             f"{r['flop_step'] / g:.1f}", f"{r['achieved_flops'] / g:.1f}", f"{r['matmul_flops'] / g:.1f}",
             f"{r['achieved_flops'] / r['matmul_flops']:.2f}", f"{r['weights_mib']:.0f}", f"{r['peak_rss_mib']:.0f}",
             f"{r['s_step_official'] / r['s_step']:.2f}", f"{r['s_step_unbatched'] / r['s_step']:.2f}"]
            for r in results]
    out = [fmt_table(main, ["task", "dtype", "branches", "fwd/step", "s/step", "GFLOP/step", "achieved GFLOP/s",
                            "matmul GFLOP/s", "ratio", "weights MiB", "peak RSS MiB", "official/opt",
                            "unbatched/batched"])]
    detail = [[r["task"], r["dtype"], f"{r['s_step']:.3f} / {r['s_step_opt_median']:.3f}",
               f"{r['s_step_unbatched']:.3f} / {r['s_step_unbatched_median']:.3f}",
               f"{r['s_step_official']:.3f} / {r['s_step_official_median']:.3f}",
               f"{r['flop_refine_prepare'] / g:.1f}", f"{r['achieved_flops_official'] / g:.1f}", r["matmul_shape"],
               f"{r['other_load_cores']:.2f}"]
              for r in results]
    out += ["", fmt_table(detail, ["task", "dtype", "opt s/step best/med", "unbatched best/med",
                                   "official best/med", "GFLOP refine+prep", "official GFLOP/s", "matmul MxKxN",
                                   "other load (cores)"])]
    busy = [r for r in results if r["other_load_cores"] > 0.2]
    if busy:
        out += ["", "WARNING: other processes used the CPU during the timed steps of "
                + ", ".join(f"{r['task']}/{r['dtype']} ({r['other_load_cores']:.2f} cores)" for r in busy)
                + f" of {os.cpu_count()}; absolute timings and ratios are noisy -- rerun on an idle machine."]
    eq = [r for r in results if "s_step_eq_batched" in r]
    if eq:
        rows = [[r["task"], r["dtype"], f"{r['s_step_eq_batched']:.3f}", f"{r['s_step_eq_unbatched']:.3f}",
                 f"{r['s_step_eq_unbatched'] / r['s_step_eq_batched']:.2f}"] for r in eq]
        out += ["", f"all branches at {args.cond_len} text tokens (batchable):",
                fmt_table(rows, ["task", "dtype", "s/step batched", "s/step unbatched", "unbatched/batched"])]
    return "\n".join(out)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        dtype, task = args.one
        print("RESULT " + json.dumps(run_one(dtype, task, args)), flush=True)
        return 0

    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    for d in dtypes:
        if d not in DTYPES:
            raise SystemExit(f"unknown dtype {d!r}: use fp32 or bf16")
    for t in tasks:
        if t not in TASKS:
            raise SystemExit(f"unknown task {t!r}: use t2i or edit")

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, {platform.processor() or platform.machine()}, "
          f"python {platform.python_version()}")
    print(f"MMDiT hidden 1536 / 12 heads, {args.depth} double + {args.single} single blocks (full: 6 + 12), "
          f"{args.size}x{args.size} ({(args.size // 16) ** 2} noise tokens), text {args.cond_len} cond / "
          f"{args.uncond_len} uncond tokens, {args.steps} timed steps per path; one subprocess per row", flush=True)
    results = []
    t_all = time.perf_counter()
    for dtype in dtypes:
        for task in tasks:
            t0 = time.perf_counter()
            proc = subprocess.run(child_argv(args, dtype, task), capture_output=True, text=True, cwd=str(ROOT))
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not lines:
                sys.stderr.write(proc.stdout + proc.stderr)
                raise SystemExit(f"benchmark of {task}/{dtype} failed (exit {proc.returncode})")
            results.append(json.loads(lines[-1][len("RESULT "):]))
            print(f"  {task}/{dtype} done in {time.perf_counter() - t0:.0f} s", flush=True)
    print()
    print(report(results, args))
    print()
    legend = [
        "s/step: best of the timed steps, optimized path (refiner/prepare cached, equal-length branches batched).",
        "fwd/step: MMDiT forwards per step of that path (< branches only where branches share a text length).",
        "ratio: achieved / matmul FLOP/s (same dtype, same process).",
        "official/opt: reference-style step (refiner + prepare per branch per step, one forward per branch) over opt.",
        "unbatched/batched: denoise(batch=False) over denoise(batch=True).",
        "peak RSS: ru_maxrss of the row's own process (weights + activations + runtime).",
        f"total {time.perf_counter() - t_all:.0f} s",
    ]
    print("\n".join(legend))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(torch=torch.__version__, threads=torch.get_num_threads(),
                                                   args={k: v for k, v in vars(args).items() if k != "one"},
                                                   results=results), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
