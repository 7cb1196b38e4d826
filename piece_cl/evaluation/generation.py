"""Batched generation for evaluation: left padding, KV cache, greedy (deterministic) by default.

Prompts are sorted by length before batching so that a batch wastes little on padding; the
outputs are returned in the caller's order. `generate_for_eval` is the one reading of the `eval.*`
settings (sampling, batch size, prompt cut) that tasks and both probes go through. Under data parallelism each rank generates its share of
those batches (evaluation/sharding.py) and every rank returns all outputs.
"""
from __future__ import annotations

from typing import Callable

import torch

from piece_cl.data.multimodal import is_multimodal, processor_inputs, text_tokenizer
from piece_cl.errors import PieceError
from piece_cl.evaluation.sharding import Shard


def generate(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int = 16,
    do_sample: bool = False,
    top_k: int | None = None,
    top_p: float | None = None,
    temperature: float | None = None,
    seed: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    images: list[str] | None = None,
    max_prompt_len: int | None = None,
    shard: Shard | None = None,
) -> list[str]:
    """The new text generated after each prompt (special tokens stripped), in the order of `prompts`.

    `progress(done, total)` is called after every batch. Sampling draws from its own RNG stream,
    reseeded from (`seed`, batch number) at every batch, so evaluation never disturbs the training RNG
    and a batch samples the same on any rank. With `shard`, this rank generates batch j when
    `shard.owns(j)` and the outputs of all ranks are gathered. For a multimodal model `tokenizer`
    is its processor and `images` holds one image path per prompt. Text prompts longer than
    `max_prompt_len` tokens lose their beginning exactly as in training (the instruction's end stays next
    to the answer); multimodal prompts are never cut (their image tokens must stay whole).
    """
    if images is not None and (len(images) != len(prompts) or not is_multimodal(tokenizer)):
        raise PieceError(f"generate: {len(images)} images for {len(prompts)} prompts need as many, and a multimodal model")
    processor, tokenizer = tokenizer, text_tokenizer(tokenizer)
    keep = -int(max_prompt_len) if max_prompt_len and images is None else None
    token_ids = [ids[keep:] for ids in tokenizer(prompts)["input_ids"]]  # cut exactly as collate.encode_record
    order = sorted(range(len(prompts)), key=lambda i: len(token_ids[i]))
    sampling = {"do_sample": True, "top_k": top_k, "top_p": top_p, "temperature": temperature} if do_sample else {
        "do_sample": False, "top_k": None, "top_p": None, "temperature": None}
    shard = shard or Shard()
    outputs: dict[int, str] = {}
    was_training, padding_side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else [], enabled=seed is not None):
            for number, start in enumerate(range(0, len(order), batch_size)):
                if not shard.owns(number):
                    continue
                if seed is not None:
                    torch.manual_seed(int(seed) * 100_003 + number)
                batch = order[start:start + batch_size]
                batch_prompts = [prompts[i] for i in batch]
                if images is None:
                    encoded = tokenizer.pad({"input_ids": [token_ids[i] for i in batch]}, return_tensors="pt").to(device)
                else:
                    encoded = processor_inputs(processor, batch_prompts, [images[i] for i in batch]).to(device)
                with torch.no_grad():
                    generated = model.generate(
                        **encoded,
                        max_new_tokens=max_new_tokens,
                        pad_token_id=tokenizer.pad_token_id,
                        eos_token_id=tokenizer.eos_token_id,
                        **sampling,
                    )
                new_tokens = generated[:, encoded["input_ids"].shape[1]:]
                for i, text in zip(batch, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
                    outputs[i] = text
                shard.generated += len(batch)
                if progress is not None:
                    progress(min(start + batch_size, len(order)), len(order))
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    outputs = shard.gather(outputs)
    return [outputs[i] for i in range(len(prompts))]


def generate_for_eval(model, tokenizer, prompts: list[str], gen_cfg, max_new_tokens: int, *,
                      batch_size: int | None = None, images: list[str] | None = None, shard: Shard | None = None,
                      cut_prompts: bool = True) -> list[str]:
    """`generate` as the `eval.*` config `gen_cfg` says (greedy, or the authors' sampler), for tasks and probes.

    `batch_size` overrides `eval.batch_size`; `cut_prompts=False` keeps prompts whole whatever
    `eval.max_prompt_len` says (a probe's problem must be read in full).
    """
    return generate(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens,
        batch_size=int(batch_size or gen_cfg.get("batch_size", 16)),
        do_sample=bool(gen_cfg.get("do_sample", False)), top_k=gen_cfg.get("top_k"), top_p=gen_cfg.get("top_p"),
        temperature=gen_cfg.get("temperature"), seed=gen_cfg.get("seed"),
        max_prompt_len=gen_cfg.get("max_prompt_len") if cut_prompts else None, images=images, shard=shard,
    )
