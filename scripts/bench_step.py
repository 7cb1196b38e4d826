"""One optimiser step of PIECE-S against SeqFT on the same batch: time and peak memory, side by side.

    .venv/bin/python scripts/bench_step.py            # both regimes, a few minutes on 2 cores
    .venv/bin/python scripts/bench_step.py --steps 8 --regimes small

Every (regime, mode) runs in its own process, so peak RSS is that mode's alone. Modes:
  seqft         torch AdamW over every non-embedding parameter (dense gradients, dense state)
  piece_s       SparseMaskedAdam, selected nn.Linear entries without dense weight gradients (default)
  piece_s_hooks SparseMaskedAdam with post-accumulate hooks only (dense gradient formed, gathered, freed)
The mask holds k = floor(0.001·|θ|) entries drawn uniformly over the eligible (non-embedding) entries,
the worst case for the hook path (every tensor holds selections, so every weight gradient is formed);
its cost does not depend on where the entries sit for the other modes.
Regimes: "small" = hidden 768, 8 layers, vocab 8000, batch 2×128 (parameter state dominates memory);
"large" = the same with a 32k vocabulary at batch 8×256 (activations dominate).
Step time: median over `--steps` steps after `--warmup` steps in each process, then the median over
`--rounds` processes per mode (interleaved with the other modes); the machine may be shared, so rerun.
"CPU s" is the process CPU time of a step (all threads): on an oversubscribed machine it is a steadier
proxy for the work done than wall time.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

REGIMES = {
    "small": {"vocab": 8000, "batch": 2, "tokens": 128},
    "large": {"vocab": 32000, "batch": 8, "tokens": 256},
}
MODES = ("seqft", "piece_s", "piece_s_hooks")
HYPER = {"lr": 1e-5, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.0}
RATIO = 0.001
CLIP = 1.0


def build_model(vocab: int, hidden: int, layers: int, intermediate: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         max_position_embeddings=512, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def uniform_mask(named_params, k: int, seed: int = 0):
    """k distinct flat positions, uniform over the concatenated tensors, in O(k) memory; name -> sorted indices."""
    import torch

    sizes = torch.tensor([p.numel() for _, p in named_params])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.empty(0, dtype=torch.long)
    while chosen.numel() < k:
        draw = torch.randint(int(offsets[-1]), (2 * (k - chosen.numel()),), generator=generator)
        chosen = torch.cat([chosen, draw]).unique()  # sorted
    chosen = chosen[torch.randperm(chosen.numel(), generator=generator)[:k]].sort().values
    owner = torch.searchsorted(offsets, chosen, right=True) - 1
    return {name: chosen[owner == i] - offsets[i] for i, (name, _) in enumerate(named_params) if (owner == i).any()}


def child(mode: str, regime: str, args) -> dict:
    import torch

    from piece_cl.training.sparse import AdamSettings, SparseMaskedAdam

    shape = REGIMES[regime]
    model = build_model(shape["vocab"], args.hidden, args.layers, args.intermediate)
    named = [(n, p) for n, p in model.named_parameters() if "embed_tokens" not in n]
    model.get_input_embeddings().weight.requires_grad_(False)  # frozen in every method, as the authors'
    total = sum(p.numel() for p in model.parameters())
    k = int(RATIO * total)
    if mode == "seqft":
        optimizer = torch.optim.AdamW([p for _, p in named], **HYPER)
        clip = lambda: torch.nn.utils.clip_grad_norm_([p for _, p in named if p.grad is not None], CLIP)  # noqa: E731
    else:
        masks = uniform_mask(named, k)
        for name, param in named:
            param.requires_grad_(name in masks)
        optimizer = SparseMaskedAdam(model, masks, AdamSettings(**HYPER), fast_linear=mode == "piece_s")
        clip = lambda: optimizer.clip_grad_norm_(CLIP)  # noqa: E731
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, shape["vocab"], (shape["batch"], shape["tokens"]), generator=generator)
    labels = ids.clone()
    labels[:, : shape["tokens"] // 2] = -100  # prompt half, as in instruction data
    times, cpu = [], []
    for _ in range(args.warmup + args.steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        model(input_ids=ids, labels=labels).loss.backward()
        clip()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    return {"mode": mode, "regime": regime, "params": total, "k": k, "step_s": statistics.median(times[args.warmup :]),
            "cpu_s": statistics.median(cpu[args.warmup :]), "peak_rss_gb": peak_gb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=list(REGIMES))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="processes per mode, interleaved; medians are reported")
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--child", nargs=2, metavar=("MODE", "REGIME"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args)))
        return
    shared = [f"--steps={args.steps}", f"--warmup={args.warmup}", f"--hidden={args.hidden}",
              f"--layers={args.layers}", f"--intermediate={args.intermediate}"]
    modes = ("seqft", *[m for m in args.modes if m != "seqft"])
    print(f"{'regime':<7} {'mode':<14} {'params':>8} {'k':>7} {'step s':>8} {'× seqft':>8} {'CPU s':>8} {'× seqft':>8} "
          f"{'peak RSS GB':>12} {'× seqft':>8}   per-round step medians (s)")
    for regime in args.regimes:
        runs: dict[str, list[dict]] = {mode: [] for mode in modes}
        for _ in range(args.rounds):  # modes interleaved, so a burst of load hits all of them alike
            for mode in modes:
                out = subprocess.run([sys.executable, __file__, "--child", mode, regime, *shared],
                                     capture_output=True, text=True, check=True)
                runs[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
        summary = {mode: {key: statistics.median(r[key] for r in rs) for key in ("step_s", "cpu_s", "peak_rss_gb")}
                   for mode, rs in runs.items()}
        base = summary["seqft"]
        for mode in modes:
            first, s = runs[mode][0], summary[mode]
            rounds = " ".join(f"{r['step_s']:.3f}" for r in runs[mode])
            print(f"{regime:<7} {mode:<14} {first['params'] / 1e6:>7.1f}M {first['k']:>7} {s['step_s']:>8.3f} "
                  f"{s['step_s'] / base['step_s']:>8.2f} {s['cpu_s']:>8.3f} {s['cpu_s'] / base['cpu_s']:>8.2f} {s['peak_rss_gb']:>12.2f} {s['peak_rss_gb'] / base['peak_rss_gb']:>8.2f}"
                  f"   {rounds}", flush=True)


if __name__ == "__main__":
    main()
