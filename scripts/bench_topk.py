"""Global top-k over many score tensors: piece_cl.importance.select_top_k vs concatenate-and-topk.

Synthetic scores (default 200M fp32 in 300 tensors of uneven sizes, values quantised to steps of 0.1
so the threshold has many ties, some tensors all zero). Each path runs in its own subprocess; its extra
memory is the peak RSS during selection above the RSS once the scores exist (peak reset through
/proc/self/clear_refs). The baseline breaks ties like select_top_k (smallest tensor name, flat index).

    .venv/bin/python scripts/bench_topk.py
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from piece_cl.importance import select_top_k  # noqa: E402


def make_scores(entries: int, tensors: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    weights = torch.rand(tensors, generator=gen) ** 3 + 0.01
    sizes = (weights / weights.sum() * entries).long()
    sizes[-1] += entries - sizes.sum()
    scores = {}
    for i, size in enumerate(sizes.tolist()):
        t = torch.empty(size)
        if i % 10 == 3:
            t.zero_()  # tensors that never get a gradient
        else:
            t.exponential_(generator=gen).mul_(10).floor_().div_(10)  # in place: no temporary copies
        scores[f"layer.{i:03d}.weight"] = t
    return scores


def concatenate_and_topk(scores: dict, ratio: float) -> dict:
    names = sorted(scores)
    flat = torch.cat([scores[n].reshape(-1) for n in names])
    k = int(ratio * flat.numel())
    threshold = flat.topk(k).values.min()
    above = (flat > threshold).nonzero().squeeze(1)
    chosen = torch.cat([above, (flat == threshold).nonzero().squeeze(1)[: k - above.numel()]]).sort().values
    out, offset = {}, 0
    for n in names:
        size = scores[n].numel()
        lo, hi = torch.searchsorted(chosen, torch.tensor([offset, offset + size])).tolist()
        if hi > lo:
            out[n] = chosen[lo:hi] - offset
        offset += size
    return out


def _vm_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    raise RuntimeError(field)


def worker(args) -> None:
    torch.set_num_threads(args.threads)
    scores = make_scores(args.entries, args.tensors)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    before = _vm_kb("VmRSS:")
    start = time.perf_counter()
    picked = select_top_k(scores, args.ratio) if args.worker == "select" else concatenate_and_topk(scores, args.ratio)
    seconds = time.perf_counter() - start
    extra_mb = (_vm_kb("VmHWM:") - before) / 1024
    torch.save(picked, args.out)
    print(json.dumps({"seconds": seconds, "extra_mb": extra_mb, "scores_mb": args.entries * 4 / 2**20}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=200_000_000)
    parser.add_argument("--tensors", type=int, default=300)
    parser.add_argument("--ratio", type=float, default=0.001)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads per path")
    parser.add_argument("--worker", choices=("select", "concat"), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    results, picks = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for path in ("select", "concat"):
            out = Path(tmp) / f"{path}.pt"
            cmd = [sys.executable, __file__, "--worker", path, "--out", str(out),
                   "--entries", str(args.entries), "--tensors", str(args.tensors), "--ratio", str(args.ratio), "--threads", str(args.threads)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results[path] = json.loads(done.stdout.strip().splitlines()[-1])
            picks[path] = torch.load(out)
    same = picks["select"].keys() == picks["concat"].keys() and all(torch.equal(picks["select"][n], picks["concat"][n]) for n in picks["concat"])
    k = sum(t.numel() for t in picks["select"].values())
    scores_mb = results["select"]["scores_mb"]
    print(f"{args.entries:,} scores ({scores_mb:.0f} MB) in {args.tensors} tensors, ratio {args.ratio}: k = {k:,} "
          f"in {len(picks['select'])} tensors, {args.threads} torch threads; identical selection: {same}")
    print(f"{'path':8} {'time s':>8} {'extra MB':>10} {'extra / scores':>15}")
    for path, r in results.items():
        print(f"{path:8} {r['seconds']:8.2f} {r['extra_mb']:10.1f} {r['extra_mb'] / scores_mb:15.3f}")
    print(f"select / concat: time {results['select']['seconds'] / results['concat']['seconds']:.2f}x, "
          f"extra memory {results['select']['extra_mb'] / max(results['concat']['extra_mb'], 1e-9):.3f}x")


if __name__ == "__main__":
    main()
