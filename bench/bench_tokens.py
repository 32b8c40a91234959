"""Seconds per generated token of Understand's greedy decoding, and the bytes one token creates (not a test).

For a checkpoint folder (e.g. the mid-size one of ``mid_checkpoint.py``), every row — a checkout (``--root``, to
compare the library before and after a change) × a weight storage (``default`` / ``fp8_e4m3fn``) — runs in its own
subprocess: it loads the model on the CPU in --dtype, builds a text-only Understand prompt of about
``--prompt-tokens`` tokens and decodes ``--new-tokens`` greedy tokens with the library's KV-cached loop
(``ovis_u1.llm.generate``, end-of-sequence ignored so that every row makes as many tokens). It reports:

* ``s/token`` -- the median time between two generated tokens (the first, which includes the prompt pass, left
  out), then the median of that over the ``--repeat`` rounds; ``cpu s/token`` the same in the process's CPU time,
  which other load on a shared machine disturbs less (one thread: the two agree on an idle machine);
* ``MB/token`` -- the bytes of the tensor storages the last token's step creates (a ``TorchDispatchMode`` sees
  every aten op; the weights and the KV cache existed before): what one token allocates, fp8 → compute-dtype weight
  copies and KV copies included;
* the greedy tokens (a hash, and whether every row of a storage gave the same ones).

``--vocab V`` widens the tied embedding table to V random rows after loading (the real Ovis-U1 has 151936, the
mid-size checkpoint 320), in the dtype the loader stored the table in, to weigh what the table costs per token at
the real vocabulary; the tokens then differ from the checkpoint's own.

    python bench/bench_tokens.py /tmp/ovis_mid/ovis_u1_mid [--root BEFORE --root .] [--storage default,fp8_e4m3fn]
        [--new-tokens 64] [--prompt-tokens 256] [--vocab 151936] [--repeat 3] [--threads 1] [--json out.json]

Rows run interleaved (every row once per round) so that other load on the machine spreads over all of them;
compare ratios from one run, not numbers across machines.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the worker puts --root before it, for its ovis_u1

from bench.bench_loading import run_json  # noqa: E402

QUESTION_WORD = "describe "


# ----------------------------------------------------------------------------------------------------- worker
def created_bytes_counter():
    """A ``TorchDispatchMode`` whose ``bytes`` sums the storages the ops run under it create (freed or not)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class CreatedBytes(TorchDispatchMode):
        bytes = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                      if isinstance(t, torch.Tensor)}
            created = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tree_flatten(out)[0]
                       if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs}
            self.bytes += sum(created.values())
            return out

    return CreatedBytes()


def widen_table(model, rows: int, seed: int = 0) -> None:
    """The tied embedding table replaced by ``rows`` random rows in the dtype it is stored in."""
    import torch

    table = model.llm.get_input_embeddings()
    stored = table.weight
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(rows, stored.shape[1], generator=generator) * 0.02
    table.weight = torch.nn.Parameter(values.to(stored.dtype), requires_grad=False)
    table.num_embeddings = rows


def prompt_ids(tokenizer, tokens: int) -> list[int]:
    """A text-only Understand prompt of about ``tokens`` tokens (a question of repeated words)."""
    from ovis_u1 import prompts

    def ids(words: int) -> list[int]:
        return prompts.understanding_ids(tokenizer, QUESTION_WORD * words, 0, None)

    per_word = len(ids(2)) - len(ids(1))
    fixed = len(ids(1)) - per_word
    return ids(max(1, (tokens - fixed) // per_word))


def worker(args) -> dict:
    sys.path.insert(0, args.root)
    import torch

    import ovis_u1
    from ovis_u1 import attention
    from ovis_u1.llm import generate

    torch.set_num_threads(args.threads)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    model = ovis_u1.load_model(args.checkpoint, device="cpu", dtype=dtype,
                               weight_dtype=None if args.storage == "default" else args.storage)
    if args.vocab:
        widen_table(model, args.vocab)
    table = model.llm.get_input_embeddings()
    ids = prompt_ids(model.tokenizer, args.prompt_tokens)
    with torch.inference_mode():
        embeds = table(torch.tensor(ids))

    def decode(on_token):  # every row makes --new-tokens tokens: no end-of-sequence stop
        with attention.using(model.attention):
            return generate(model.llm, embeds, None, args.new_tokens, on_token=on_token)

    stamps: list[tuple[float, float]] = []
    tokens = decode(lambda i, n: stamps.append((time.perf_counter(), time.process_time())))
    # the first token's time includes the prompt pass
    gaps = [[b[c] - a[c] for a, b in zip(stamps, stamps[1:])] for c in (0, 1)]

    counter = created_bytes_counter()

    def count_last_step(i: int, n: int) -> None:  # from the second-to-last token's report to the last one's
        if i == n - 1:
            counter.__enter__()
        elif i == n:
            counter.__exit__(None, None, None)

    assert decode(count_last_step) == tokens, "greedy decoding is not deterministic"
    return {"root": args.root, "storage": args.storage, "table": str(table.weight.dtype).replace("torch.", ""),
            "prompt_tokens": len(ids), "new_tokens": len(tokens), "s_per_token": statistics.median(gaps[0]),
            "cpu_s_per_token": statistics.median(gaps[1]),
            "bytes_per_token": counter.bytes, "tokens_hash": hashlib.sha1(json.dumps(tokens).encode()).hexdigest()[:12]}


def run_worker(args, root: str, storage: str) -> dict:
    return run_json([sys.executable, __file__, args.checkpoint, "--worker", "--root", root, "--storage", storage,
                     "--dtype", args.dtype, "--new-tokens", str(args.new_tokens), "--prompt-tokens",
                     str(args.prompt_tokens), "--vocab", str(args.vocab), "--threads", str(args.threads)])


# ----------------------------------------------------------------------------------------------------- report
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="an Ovis-U1 checkpoint folder (bench/mid_checkpoint.py builds one)")
    parser.add_argument("--root", action="append", help="checkout whose ovis_u1 runs (repeatable; default this one)")
    parser.add_argument("--storage", default="default,fp8_e4m3fn")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=0, help="widen the tied table to this many rows (0: as loaded)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; every row runs once per round")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    roots = [str(Path(r).resolve()) for r in (args.root or [str(ROOT)])]
    if args.worker:
        args.root = roots[0]
        print(json.dumps(worker(args)))
        return

    storages = args.storage.split(",")
    rows: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.repeat):
        for storage in storages:
            for root in roots:
                rows.setdefault((root, storage), []).append(run_worker(args, root, storage))

    print(f"{args.checkpoint}, {args.dtype} compute, {args.threads} thread(s), vocab "
          f"{args.vocab or 'as stored'}, median of {args.repeat} round(s)")
    print(f"{'checkout':<40} {'storage':<11} {'table':<14} {'prompt':>6} {'new':>4} {'s/token':>9} {'cpu s/token':>11} "
          f"{'MB/token':>9} {'tokens':>12}")
    summary = []
    for (root, storage), results in rows.items():
        first = results[0]
        medians = {key: statistics.median(r[key] for r in results) for key in ("s_per_token", "cpu_s_per_token")}
        row = {**first, **medians,
               "rounds": [r["s_per_token"] for r in results], "cpu_rounds": [r["cpu_s_per_token"] for r in results]}
        summary.append(row)
        print(f"{root[-40:]:<40} {storage:<11} {first['table']:<14} {first['prompt_tokens']:>6} "
              f"{first['new_tokens']:>4} {row['s_per_token']:>9.4f} {row['cpu_s_per_token']:>11.4f} "
              f"{first['bytes_per_token'] / 1e6:>9.1f} "
              f"{first['tokens_hash']:>12}")
    for storage in storages:
        same = {r["tokens_hash"] for r in summary if r["storage"] == storage}
        times = [(r["s_per_token"], r["cpu_s_per_token"]) for r in summary if r["storage"] == storage]
        ratio = "" if len(times) < 2 else (f", last/first checkout: s/token {times[-1][0] / times[0][0]:.2f}, "
                                           f"cpu s/token {times[-1][1] / times[0][1]:.2f}")
        print(f"{storage}: {'the same greedy tokens in every checkout' if len(same) == 1 else 'TOKENS DIFFER'}"
              f"{ratio}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
