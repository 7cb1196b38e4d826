"""Importance on N CPU ranks (gloo) vs one process: bytes of Σg/Σg² each rank holds, peak RSS added by the
estimate, samples each rank processed, seconds, and whether the masks agree.

Each configuration runs in fresh processes (one, then N spawned ranks) on the same random Llama and the
same samples; the sums' bytes are counted from the tensors the estimate held (`work["moment_bytes"]`,
the figure `importance.moment_bytes` predicts), the RSS from ru_maxrss minus the RSS before the estimate.

    .venv/bin/python scripts/bench_importance_sharded.py            # 2 ranks, hidden 512, 4 layers, S and F
    .venv/bin/python scripts/bench_importance_sharded.py --state-8b # the per-rank state table of docs/cluster.md
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from piece_cl.importance import eligible_parameters, estimate, moment_bytes, select_top_k  # noqa: E402


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _measure(rank: int, world: int, args, out: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{out}.store", rank=rank, world_size=world)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=8, num_key_value_heads=8, vocab_size=args.vocab, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, args.vocab, (args.samples, args.tokens), generator=gen)
    labels = ids.clone()
    labels[:, : args.tokens // 2] = -100
    batches = [{"input_ids": ids[i : i + args.chunk], "labels": labels[i : i + args.chunk]}
               for i in range(0, args.samples, args.chunk)]
    work: dict = {}
    before = _rss_bytes()
    start = time.perf_counter()
    scores = estimate(model, batches, args.kind, chunk_size=args.chunk, work=work)
    masks = select_top_k(scores, args.ratio, total=sum(p.numel() for p in model.parameters()))
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = {"rank": rank, "seconds": seconds, "added_rss": peak - before, "work": work,
              "eligible": sum(p.numel() for _, p in eligible_parameters(model)),
              "largest": max(p.numel() for _, p in eligible_parameters(model)),
              "masks": {n: i.tolist() for n, i in masks.items()}}
    if world > 1:
        dist.destroy_process_group()
    Path(f"{out}.{world}.{rank}.json").write_text(json.dumps(result))


def _run(world: int, args, out: str) -> list[dict]:
    """`world` fresh spawned processes (one process: no process group), their results."""
    mp.start_processes(_measure, args=(world, args, out), nprocs=world, join=True, start_method="spawn")
    return [json.loads(Path(f"{out}.{world}.{r}.json").read_text()) for r in range(world)]


LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)  # its config.json
TRACE_TASKS = 8


def state_8b(worlds=(1, 4, 8)) -> None:
    """What each method keeps beside the weights, per rank, for Llama3-8B (built on the meta device).

    Sharded sums on N > 1 ranks include the transient whole-tensor buffer of the largest layer (lm_head)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA3_8B))
    total = sum(p.numel() for p in model.parameters())
    exclude = ["embed_tokens"]  # PIECE's and the other methods' frozen embeddings (configs/method/*.yaml)
    eligible = eligible_parameters(model, exclude=exclude)
    n = sum(p.numel() for _, p in eligible)
    largest = max(p.numel() for _, p in eligible)
    rows_out = sum(m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))
    gb = 1e9
    rows = [
        ("PIECE-S importance: Σg, Σg² (fp32), sharded", lambda w: moment_bytes(n, w, "s", largest=largest if w > 1 else 0)),
        ("PIECE-F importance: Σg² (fp32), sharded", lambda w: moment_bytes(n, w, "fisher", largest=largest if w > 1 else 0)),
        ("EWC while estimating: Σg² (fp32), sharded", lambda w: moment_bytes(n, w, "fisher", largest=largest if w > 1 else 0)),
        ("EWC state: F and θ* (fisher_dtype fp32), whole", lambda w: 2 * n * 4),
        (f"GEM at task {TRACE_TASKS}: {TRACE_TASKS - 1} reference gradients (fp32), whole",
         lambda w: (TRACE_TASKS - 1) * n * 4),
        ("LwF: the teacher (bf16 copy of the model), whole", lambda w: total * 2),
        ("MIGU: one fp32 score per Linear output row", lambda w: rows_out * 4),
    ]
    print(f"Llama3-8B: {total:,} parameters, {n:,} eligible (embeddings frozen), largest tensor {largest:,}")
    print("| state | " + " | ".join(f"{w} rank{'s' if w > 1 else ''}" for w in worlds) + " |")
    print("|---|" + "---|" * len(worlds))
    for label, size in rows:
        print(f"| {label} | " + " | ".join(f"{size(w) / gb:.2f} GB" for w in worlds) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=4)
    parser.add_argument("--ratio", type=float, default=0.001)
    parser.add_argument("--kinds", default="s,fisher")
    parser.add_argument("--state-8b", action="store_true", help="print the per-rank state table for Llama3-8B")
    args = parser.parse_args()
    if args.state_8b:
        state_8b()
        return
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.kinds.split(","):
            args.kind = kind
            out = os.path.join(tmp, kind)
            one, = _run(1, args, out)
            ranks = _run(args.world, args, out)
            base = one["work"]["moment_bytes"]
            per_rank = max(r["work"]["moment_bytes"] for r in ranks)
            predicted = moment_bytes(one["eligible"], args.world, kind)
            same = all(r["masks"] == one["masks"] for r in ranks)
            differing = sum(len(set(one["masks"].get(n, [])) ^ set(ranks[0]["masks"].get(n, [])))
                            for n in set(one["masks"]) | set(ranks[0]["masks"]))
            print(f"kind {kind}: {one['eligible']:,} eligible entries, {args.samples} samples x {args.tokens} tokens, "
                  f"chunk {args.chunk}, ratio {args.ratio}")
            print(f"  sums per rank: 1 process {base / 2**20:.1f} MiB, {args.world} ranks "
                  f"{[round(r['work']['moment_bytes'] / 2**20, 1) for r in ranks]} MiB "
                  f"(moment_bytes predicts {predicted / 2**20:.1f}) -> ratio {per_rank / base:.3f}")
            print(f"  peak RSS added by estimate+top-k: 1 process {one['added_rss'] / 2**20:.0f} MiB, ranks "
                  f"{[round(r['added_rss'] / 2**20) for r in ranks]} MiB -> ratio "
                  f"{max(r['added_rss'] for r in ranks) / max(1, one['added_rss']):.3f}")
            print(f"  samples per rank {[r['work']['samples_here'] for r in ranks]} of {one['work']['samples']}; "
                  f"seconds 1 process {one['seconds']:.1f}, ranks {[round(r['seconds'], 1) for r in ranks]}")
            print(f"  masks identical on every rank and to one process: {same} ({differing} entries differ)")


if __name__ == "__main__":
    main()
