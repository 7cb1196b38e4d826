"""The memory plan against measurement: predicted vs measured peak RSS of each phase, one fresh process per point.

    python scripts/bench_memory.py                        # 50M and 200M, bf16 and fp32, all four phases
    python scripts/bench_memory.py --sizes 400m --dtypes float32   # the 400M point (≈6 GB for SeqFT fp32)
    python scripts/bench_memory.py --sizes 50m --phases piece_s_step --json

Phases: importance_f / importance_s (importance.estimate + select_top_k on 4 samples x 128 tokens, one chunk),
piece_s_step (SparseMaskedAdam, k = 0.001|θ| uniform entries, fast_linear) and seqft_step (torch AdamW over
the non-embedding parameters), each 2 steps of micro batch 2 x 128 tokens with clipping. Each point runs in
its own process: RSS before the model is built is the baseline; after building it the peak is reset
(/proc/self/clear_refs), so the measured peak is the phase's high-water mark (VmHWM) minus that baseline,
weights included. The prediction is piece_plan's Planner on the same shapes (meta device, no weights).
Target: |predicted / measured - 1| <= 15% at every point.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

SIZES = {  # Llama-shaped, vocab 32000, head_dim 64 ("9m": the fast check in tests/test_plan.py)
    "9m": {"hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 2},
    "50m": {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 6},
    "200m": {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 10},
    "400m": {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 24},
}
PHASES = ("importance_f", "importance_s", "piece_s_step", "seqft_step")
DTYPES = ("bfloat16", "float32")
VOCAB, PROMPT, ANSWER = 32000, 64, 64
SAMPLES, CHUNK, MICRO, STEPS, RATIO = 4, 4, 2, 2, 0.001


def llama_config(size: str):
    from transformers import LlamaConfig

    arch = SIZES[size]
    heads = arch["hidden_size"] // 64
    return LlamaConfig(vocab_size=VOCAB, num_attention_heads=heads, num_key_value_heads=heads,
                       max_position_embeddings=512, tie_word_embeddings=False, **arch)


def plan_cfg(phase: str, dtype: str):
    """The composed-config fields the planner reads, for this benchmark's shapes."""
    from omegaconf import OmegaConf

    method = {"importance_f": "piece_f", "importance_s": "piece_s", "piece_s_step": "piece_s",
              "seqft_step": "seqft"}[phase]
    return OmegaConf.create({
        "model": {"name": "bench", "dtype": dtype},
        "method": {"name": method, "ratio": RATIO, "exclude": ["embed_tokens"],
                   "importance": {"granularity": "sample", "chunk_size": CHUNK, "batch_size": CHUNK}},
        "trainer": {"engine": "torch", "micro_batch_size": MICRO, "max_prompt_len": PROMPT, "max_answer_len": ANSWER},
        "eval": {"batch_size": 16, "max_prompt_len": PROMPT},
        "benchmark": {"tasks": ["a"]},
    })


def predict(size: str, phase: str, dtype: str) -> dict[str, float]:
    import torch
    from transformers import AutoModelForCausalLM

    from piece_cl.plan.memory import Planner

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(llama_config(size), dtype=getattr(torch, dtype))
    planner = Planner(plan_cfg(phase, dtype), on_gpu=False, model=model)
    chosen = planner.importance() if phase.startswith("importance") else planner.training()
    return {"params": planner.counts.total, **chosen.parts, "peak": chosen.peak}


def _status(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def child(size: str, phase: str, dtype: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from piece_cl.importance import eligible_parameters, estimate, select_top_k
    from piece_cl.training.sparse import AdamSettings, SparseMaskedAdam
    from bench_step import uniform_mask

    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    generator = torch.Generator().manual_seed(1)
    rows = SAMPLES if phase.startswith("importance") else MICRO
    ids = torch.randint(3, VOCAB, (rows, PROMPT + ANSWER), generator=generator)
    labels = ids.clone()
    labels[:, :PROMPT] = -100
    baseline = _status("VmRSS")
    model = AutoModelForCausalLM.from_config(llama_config(size), dtype=dt)
    model.get_input_embeddings().weight.requires_grad_(False)
    Path("/proc/self/clear_refs").write_text("5")  # the peak from here on: the phase's, weights resident
    if phase.startswith("importance"):
        eligible = eligible_parameters(model, exclude=["embed_tokens"])
        batches = [{"input_ids": ids[i:i + CHUNK], "labels": labels[i:i + CHUNK]} for i in range(0, rows, CHUNK)]
        scores = estimate(model, batches, "fisher" if phase == "importance_f" else "s", chunk_size=CHUNK,
                          eligible=eligible)
        select_top_k(scores, RATIO, total=sum(p.numel() for p in model.parameters()))
    else:
        named = [(n, p) for n, p in model.named_parameters() if "embed_tokens" not in n]
        hyper = {"lr": 1e-5, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.0}
        if phase == "seqft_step":
            optimizer = torch.optim.AdamW([p for _, p in named], **hyper)
            clip = lambda: torch.nn.utils.clip_grad_norm_([p for _, p in named if p.grad is not None], 1.0)  # noqa: E731
        else:
            masks = uniform_mask(named, int(RATIO * sum(p.numel() for p in model.parameters())))
            for name, param in named:
                param.requires_grad_(name in masks)
            optimizer = SparseMaskedAdam(model, masks, AdamSettings(**hyper), fast_linear=True)
            clip = lambda: optimizer.clip_grad_norm_(1.0)  # noqa: E731
        model.train()
        for _ in range(STEPS):
            model(input_ids=ids, labels=labels).loss.backward()
            clip()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return {"measured": _status("VmHWM") - baseline}


def run_point(size: str, phase: str, dtype: str) -> dict:
    command = [sys.executable, __file__, "--child", size, phase, dtype]
    out = subprocess.run(command, capture_output=True, text=True, check=True, env={**__import__("os").environ,
                                                                                      "OMP_NUM_THREADS": "1"})
    measured = json.loads(out.stdout.strip().splitlines()[-1])["measured"]
    predicted = predict(size, phase, dtype)
    return {"size": size, "dtype": dtype, "phase": phase, "measured": measured, "predicted": predicted["peak"],
            "ratio": predicted["peak"] / measured, "params": predicted["params"],
            "parts": {k: v for k, v in predicted.items() if k not in ("peak", "params")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["50m", "200m"], choices=list(SIZES))
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--phases", nargs="+", default=list(PHASES), choices=list(PHASES))
    parser.add_argument("--json", action="store_true", help="one JSON line per point (parts included)")
    parser.add_argument("--from-json", nargs="+", metavar="FILE",
                        help="re-predict the points measured in earlier --json outputs (after a calibration change)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    if args.from_json:
        points = [json.loads(line) for name in args.from_json for line in Path(name).read_text().splitlines()
                  if line.startswith("{")]
        report([{**p, "predicted": predict(p["size"], p["phase"], p["dtype"])["peak"]} for p in points])
        return
    points = []
    for size in args.sizes:
        for dtype in args.dtypes:
            for phase in args.phases:
                points.append(run_point(size, phase, dtype))
                if args.json:
                    print(json.dumps(points[-1]), flush=True)
    report(points)


def report(points: list[dict]) -> None:
    print(f"{'size':>5} {'params':>7} {'dtype':>9} {'phase':>13} {'measured GB':>11} {'predicted GB':>12} {'pred/meas':>9}")
    misses = []
    for point in points:
        ratio = point["predicted"] / point["measured"]
        print(f"{point['size']:>5} {point['params'] / 1e6:>6.0f}M {point['dtype']:>9} {point['phase']:>13} "
              f"{point['measured'] / 1e9:>11.3f} {point['predicted'] / 1e9:>12.3f} {ratio:>9.3f}", flush=True)
        if abs(ratio - 1) > 0.15:
            misses.append(f"{point['size']} {point['dtype']} {point['phase']}: {ratio:.3f}")
    print("target |pred/meas - 1| <= 0.15:", "met at every point" if not misses else "MISSED at " + "; ".join(misses))


if __name__ == "__main__":
    main()
