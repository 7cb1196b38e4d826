"""Batched vs one-prompt-at-a-time greedy generation on a tiny model: throughput ratio and agreement.

    .venv/bin/python scripts/bench_generate.py [--family llama] [--prompts 64] [--batch-size 16]

Prompts are the first HumanEval problems (real, varied lengths, so left padding matters). The tiny
model is randomly initialised, so it rarely stops early: both paths generate the full budget and the
ratio compares like with like. Prints the median ratio over repeats and the share of prompts whose
batched output equals the one-at-a-time output (target: >= 4x and >= 99%).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from piece_cl.data.humaneval import load_humaneval
from piece_cl.evaluation.generation import generate
from piece_cl.models.families import FAMILIES, build_tiny


def timed(fn) -> tuple[float, list[str]]:
    start = time.perf_counter()
    outputs = fn()
    return time.perf_counter() - start, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="llama", choices=[f for f in FAMILIES if f not in ("llava", "qwen3_vl")])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest for tiny ops)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    model, tokenizer = build_tiny(args.family)
    model.to(args.device)
    prompts = [problem["prompt"] for problem in load_humaneval(n_problems=args.prompts)]
    run = dict(max_new_tokens=args.max_new_tokens)
    generate(model, tokenizer, prompts[:2], batch_size=2, **run)  # warm-up

    ratios, agreement = [], []
    for repeat in range(args.repeats):
        batched_s, batched = timed(lambda: generate(model, tokenizer, prompts, batch_size=args.batch_size, **run))
        single_s, single = timed(lambda: [generate(model, tokenizer, [p], batch_size=1, **run)[0] for p in prompts])
        ratios.append(single_s / batched_s)
        agreement.append(sum(a == b for a, b in zip(batched, single)) / len(prompts))
        print(f"repeat {repeat + 1}: batched {batched_s:.2f} s ({len(prompts) / batched_s:.1f} prompts/s), "
              f"one at a time {single_s:.2f} s ({len(prompts) / single_s:.1f} prompts/s), "
              f"ratio {ratios[-1]:.2f}x, same output {100 * agreement[-1]:.1f}%")
    print(f"tiny {args.family}, {len(prompts)} prompts x {args.max_new_tokens} new tokens, batch {args.batch_size}, "
          f"{args.device}, {args.threads} thread(s): median throughput ratio {statistics.median(ratios):.2f}x, "
          f"same output on {100 * min(agreement):.1f}% of prompts (worst repeat)")


if __name__ == "__main__":
    main()
