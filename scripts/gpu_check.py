"""The GPU check behind scripts/gpu_check.sh: a Llama3-8B-shaped random bf16 model on one GPU.

PIECE-S importance (importance.estimate, kind "s") on SAMPLES x TOKENS, then STEPS PIECE-S training steps
(SparseMaskedAdam on the mask select_top_k returns, micro batch MICRO), each phase's
torch.cuda.max_memory_allocated beside the memory plan's prediction for the same shapes (plan/memory.py),
and samples/s. GPU_CHECK_TINY=1 runs the same code on a tiny Llama (on the GPU if there is one, else the
CPU, where the measured column reads the process's peak RSS above its baseline instead).
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TINY = os.environ.get("GPU_CHECK_TINY", "0") not in ("0", "")
ARCH = ({"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 4096} if TINY else None)
SAMPLES = int(os.environ.get("GPU_CHECK_SAMPLES", 8 if TINY else 64))
TOKENS = int(os.environ.get("GPU_CHECK_TOKENS", 64 if TINY else 1024))
CHUNK = int(os.environ.get("GPU_CHECK_CHUNK", 4 if TINY else 2))
STEPS = int(os.environ.get("GPU_CHECK_STEPS", 3 if TINY else 20))
MICRO = int(os.environ.get("GPU_CHECK_MICRO", 2))
RATIO = 0.001


def config():
    from transformers import AutoConfig, LlamaConfig

    from piece_cl.plan.published import LLAMA3_8B

    if ARCH is not None:
        return LlamaConfig(max_position_embeddings=512, tie_word_embeddings=False, **ARCH)
    fields = dict(LLAMA3_8B)
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def predictions(on_gpu: bool) -> dict[str, float]:
    import torch
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM

    from piece_cl.plan.memory import Planner

    cfg = OmegaConf.create({
        "model": {"name": "gpu_check", "dtype": "bfloat16"},
        "method": {"name": "piece_s", "ratio": RATIO, "exclude": ["embed_tokens"],
                   "importance": {"granularity": "sample", "chunk_size": CHUNK, "shard_moments": False}},
        "trainer": {"engine": "torch", "micro_batch_size": MICRO, "max_prompt_len": TOKENS // 2,
                    "max_answer_len": TOKENS - TOKENS // 2},
        "eval": {"batch_size": 16, "max_prompt_len": TOKENS // 2},
        "benchmark": {"tasks": ["a"]},
    })
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config(), dtype=torch.bfloat16)
    planner = Planner(cfg, on_gpu=on_gpu, model=model)
    return {"importance": planner.importance().peak, "training step": planner.training().peak}


class Meter:
    """Peak of a phase: CUDA's max_memory_allocated, or VmHWM above the pre-model RSS on a CPU."""

    def __init__(self, device):
        import torch

        self.torch, self.cuda = torch, device.type == "cuda"
        self.baseline = 0 if self.cuda else self._status("VmRSS")

    @staticmethod
    def _status(field: str) -> int:
        return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024

    def reset(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
        else:
            Path("/proc/self/clear_refs").write_text("5")

    def peak(self) -> int:
        if self.cuda:
            self.torch.cuda.synchronize()
            return self.torch.cuda.max_memory_allocated()
        return self._status("VmHWM") - self.baseline


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from piece_cl.importance import eligible_parameters, estimate, select_top_k
    from piece_cl.training.sparse import AdamSettings, SparseMaskedAdam

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    meter = Meter(device)
    config_ = config()
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config_, dtype=torch.bfloat16)
    model.get_input_embeddings().weight.requires_grad_(False)
    vocab = config_.vocab_size
    ids = torch.randint(3, vocab, (SAMPLES, TOKENS), device=device)
    labels = ids.clone()
    labels[:, : TOKENS // 2] = -100
    results = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
               "params": sum(p.numel() for p in model.parameters()), "samples": SAMPLES, "tokens": TOKENS,
               "chunk": CHUNK, "steps": STEPS, "micro_batch": MICRO}

    meter.reset()
    start = time.perf_counter()
    eligible = eligible_parameters(model, exclude=["embed_tokens"])
    batches = ({"input_ids": ids[i:i + CHUNK], "labels": labels[i:i + CHUNK]} for i in range(0, SAMPLES, CHUNK))
    scores = estimate(model, batches, "s", chunk_size=CHUNK, eligible=eligible)
    masks = select_top_k(scores, RATIO, total=sum(p.numel() for p in model.parameters()))
    del scores
    seconds = time.perf_counter() - start
    results["importance"] = {"peak_bytes": meter.peak(), "seconds": seconds, "samples_per_s": SAMPLES / seconds}

    for name, param in model.named_parameters():
        param.requires_grad_(name in masks)
    optimizer = SparseMaskedAdam(model, masks, AdamSettings(lr=1e-5, betas=(0.9, 0.95)), fast_linear=True)
    model.train()
    meter.reset()
    times = []
    for step in range(STEPS):
        rows = [(step * MICRO + j) % SAMPLES for j in range(MICRO)]
        start = time.perf_counter()
        model(input_ids=ids[rows], labels=labels[rows]).loss.backward()
        optimizer.clip_grad_norm_(1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    steady = times[1:] or times
    results["training step"] = {"peak_bytes": meter.peak(), "seconds_per_step": sum(steady) / len(steady),
                                "samples_per_s": MICRO * len(steady) / sum(steady)}
    optimizer.close()
    del model, optimizer

    planned = predictions(device.type == "cuda")
    print(f"gpu_check on {results['device']}: {results['params'] / 1e9:.3f} B parameters, bf16; importance "
          f"{SAMPLES} x {TOKENS} tokens (chunk {CHUNK}), {STEPS} steps of micro batch {MICRO}")
    measured_name = "max_memory_allocated" if device.type == "cuda" else "peak RSS above baseline"
    print(f"{'phase':<14} {measured_name + ' GB':>28} {'plan GB':>8} {'plan/measured':>13} {'samples/s':>10}")
    for phase in ("importance", "training step"):
        measured = results[phase]["peak_bytes"]
        results[phase]["plan_bytes"] = planned[phase]
        print(f"{phase:<14} {measured / 1e9:>28.2f} {planned[phase] / 1e9:>8.2f} {planned[phase] / measured:>13.3f} "
              f"{results[phase]['samples_per_s']:>10.2f}")
    print("json:", json.dumps(results))


if __name__ == "__main__":
    main()
