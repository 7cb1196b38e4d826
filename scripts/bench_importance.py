"""Exact per-sample Fisher/S: piece_cl.importance.estimate vs a batch-1 loop, torch.func vmap, and the floor.

The floor is one ordinary batched forward+backward over the same samples (chunks of --chunk, answer-token
log-likelihood summed, weight gradients accumulated): any exact method pays at least that. Each path runs
in its own subprocess so peak RSS is its own; times come from one more subprocess that runs the paths
round-robin (one warm-up round, then the median of --repeats rounds), so load drift hits all alike.
Prints ratios side by side and the max relative difference (max|a-b| / max|b| per tensor) to the loop.

    .venv/bin/python scripts/bench_importance.py            # tiny Llama: hidden 256, 4 layers, 64 x 128 tokens
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.func import functional_call, grad, vmap

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from piece_cl.importance import DEFAULT_XI, eligible_parameters, estimate  # noqa: E402

PATHS = ("floor", "hooks", "loop", "vmap")


def build(args, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=4, num_key_value_heads=4, vocab_size=args.vocab, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).to(device).eval()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, args.vocab, (args.samples, args.tokens), generator=gen)
    labels = ids.clone()
    for row, prompt in enumerate(torch.randint(args.tokens // 4, 3 * args.tokens // 4, (args.samples,), generator=gen)):
        labels[row, :prompt] = -100  # answer = the rest of the row: no padding, every token counts
    batches = [{"input_ids": ids[i : i + args.chunk], "labels": labels[i : i + args.chunk]} for i in range(0, args.samples, args.chunk)]
    return model, batches


def answer_nll_sum(logits, labels):
    return torch.nn.functional.cross_entropy(
        logits[..., :-1, :].reshape(-1, logits.shape[-1]).float(), labels[..., 1:].reshape(-1), reduction="sum"
    )


def _only_requiring_grad(model, params) -> list:
    for p in model.parameters():
        p.requires_grad_(False)
    return [p.requires_grad_(True) for _, p in params]


def run_floor(model, batches, device, params):
    for p in _only_requiring_grad(model, params):
        p.grad = None
    for b in batches:
        ids, labels = b["input_ids"].to(device), b["labels"].to(device)
        answer_nll_sum(model(input_ids=ids).logits, labels).backward()
    return None


def run_loop(model, batches, device, params):
    """Batch-1 loop with fp32 accumulation of Σ g and Σ g² (what estimate replaces)."""
    trainable = _only_requiring_grad(model, params)
    sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params}
    squares = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params}
    count = 0
    for b in batches:
        for row in range(b["input_ids"].shape[0]):
            ids, labels = b["input_ids"][row : row + 1].to(device), b["labels"][row : row + 1].to(device)
            grads = torch.autograd.grad(answer_nll_sum(model(input_ids=ids).logits, labels), trainable)
            for (n, _), g in zip(params, grads):
                sums[n] += g
                squares[n].addcmul_(g, g)
            count += 1
    return {n: (sums[n] / count).abs() / (squares[n] / count + DEFAULT_XI).sqrt() for n in sums}


def run_vmap(model, batches, device, params):
    """torch.func: functional_call + vmap(grad) over each chunk (no attention_mask: vmap cannot take one)."""
    frozen = {n: p.detach() for n, p in params}
    sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params}
    squares = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params}

    def nll(weights, ids, labels):
        logits = functional_call(model, weights, (ids.unsqueeze(0),)).logits
        return answer_nll_sum(logits, labels.unsqueeze(0))

    per_sample = vmap(grad(nll), in_dims=(None, 0, 0))
    count = 0
    for b in batches:
        grads = per_sample(frozen, b["input_ids"].to(device), b["labels"].to(device))
        for n, g in grads.items():
            sums[n] += g.sum(0)
            squares[n] += g.pow_(2).sum(0)
        count += b["input_ids"].shape[0]
    return {n: (sums[n] / count).abs() / (squares[n] / count + DEFAULT_XI).sqrt() for n in sums}


def run_hooks(model, batches, device, params):
    return estimate(model, batches, "s", chunk_size=batches[0]["input_ids"].shape[0], eligible=params)


def worker(args) -> None:
    """--worker PATH: one run of PATH, its peak RSS and scores (to --out). --worker time: all paths timed
    round-robin in this one process, so load changes on a shared machine hit every path alike."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(args.threads)
    model, batches = build(args, device)
    params = eligible_parameters(model)
    if args.worker != "time":
        setup_rss = _current_rss_mb()
        result = globals()[f"run_{args.worker}"](model, batches, device, params)
        if result is not None:
            torch.save({n: t.float().cpu() for n, t in result.items()}, args.out)
        report = {"peak_rss_mb": _peak_rss_mb(), "setup_rss_mb": setup_rss}
        if device == "cuda":
            report["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
        return print(json.dumps(report))
    paths = args.paths.split(",")
    times = {path: [] for path in paths}
    for repeat in range(args.repeats + 1):  # round 0 is the warm-up
        for path in paths:
            _sync(device)
            start = time.perf_counter()
            globals()[f"run_{path}"](model, batches, device, params)
            _sync(device)
            if repeat:
                times[path].append(time.perf_counter() - start)
    print(json.dumps(times))


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def max_relative_difference(a: dict, b: dict) -> float:
    return max(((a[n] - b[n]).abs().max() / b[n].abs().max()).item() for n in b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads per path")
    parser.add_argument("--paths", default=",".join(PATHS))
    parser.add_argument("--worker", choices=PATHS + ("time",), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    results, scores = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for path in args.paths.split(",") + ["time"]:
            out = Path(tmp) / f"{path}.pt"
            cmd = [sys.executable, __file__, "--worker", path, "--out", str(out)] + _forwarded(args)
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results[path] = json.loads(done.stdout.strip().splitlines()[-1])
            if out.exists():
                scores[path] = torch.load(out)
    times = results.pop("time")
    for path, r in results.items():
        r["time"] = statistics.median(times[path])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device {device}, torch threads {args.threads}, load average {os.getloadavg()[0]:.1f}; "
          f"Llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, {args.samples} x {args.tokens} tokens, "
          f"chunk {args.chunk}; time = median of {args.repeats} round-robin repeats")
    floor = results.get("floor")
    loop = results.get("loop")
    print(f"{'path':8} {'time s':>8} {'x floor':>8} {'x loop':>8} {'peak RSS MB':>12} {'RSS x loop':>10} {'max rel diff vs loop':>21}")
    for path, r in results.items():
        diff = max_relative_difference(scores[path], scores["loop"]) if path in scores and "loop" in scores else float("nan")
        print(f"{path:8} {r['time']:8.3f} {_ratio(r['time'], floor, 'time'):>8} {_ratio(r['time'], loop, 'time'):>8} "
              f"{r['peak_rss_mb']:12.0f} {_ratio(r['peak_rss_mb'], loop, 'peak_rss_mb'):>10} {diff:21.2e}"
              + (f"   cuda peak {r['peak_cuda_mb']:.0f} MB" if "peak_cuda_mb" in r else ""))
    print("all times:", {p: [round(t, 3) for t in ts] for p, ts in times.items()})


def _ratio(value, reference, key) -> str:
    return f"{value / reference[key]:.2f}" if reference else "-"


def _forwarded(args) -> list[str]:
    keys = ("hidden", "layers", "vocab", "samples", "tokens", "chunk", "repeats", "threads", "paths")
    return [x for k in keys for x in (f"--{k}", str(getattr(args, k)))]


if __name__ == "__main__":
    main()
