"""Image + prompt + answer records -> processor batches with the loss on the answer (+ EOS) only.

One code path for LLaVA and Qwen3-VL: the model's own processor expands the image placeholder into
image tokens and makes the pixel tensors (and Qwen3-VL's `image_grid_thw` / `mm_token_type_ids`);
the answer is tokenised separately and appended, so the label boundary never depends on a merge.
Images are opened per micro-batch, never all at once: 1,000 LLaVA images are 1.3 GB of pixels.
"""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from piece_cl.data.collate import IGNORE_INDEX
from piece_cl.errors import PieceError


def is_multimodal(processor) -> bool:
    """True for processors that take images (what `load_model` returns for multimodal models)."""
    return hasattr(processor, "image_processor") and hasattr(processor, "tokenizer")


def text_tokenizer(processor):
    """The tokenizer inside a processor, or the tokenizer itself."""
    return getattr(processor, "tokenizer", processor)


def format_prompt(processor, prompt: str) -> str:
    """The text the processor sees: the chat template when the processor keeps one (model.chat_template),
    else the image placeholder (wrapped in Qwen's vision markers) on its own line before the prompt."""
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    start, end = getattr(processor, "vision_start_token", ""), getattr(processor, "vision_end_token", "")
    return f"{start}{processor.image_token}{end}\n{prompt}"


def load_image(path: str | Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError as err:
        raise PieceError(f"cannot read image {path}: {err}") from None


def processor_inputs(processor, prompts: list[str], images: list[str | Path], padding_side: str = "left") -> dict:
    """Processor tensors for a batch of (prompt, image) pairs, padded on `padding_side` (generation: left)."""
    return processor(text=[format_prompt(processor, p) for p in prompts], images=[load_image(i) for i in images],
                     padding=True, padding_side=padding_side, return_tensors="pt")


class MultimodalCollator:
    """`encode` keeps records light (text only); `__call__` opens the images of one micro-batch.

    Prompts are not truncated: the image tokens must stay whole and VQA questions are short.
    Answers are cut to `max_answer_len - 1` tokens before EOS, as in the text collator.
    """

    def __init__(self, processor, max_answer_len: int):
        self.processor = processor
        self.tokenizer = text_tokenizer(processor)
        self.max_answer_len = max_answer_len

    def encode(self, records: list[dict]) -> list[dict]:
        features = []
        for index, record in enumerate(records):
            if not record.get("image"):
                raise PieceError(f"record {index} has no image, but the model is multimodal: use an image benchmark")
            answer = self.tokenizer(record["answer"], add_special_tokens=False)["input_ids"][: self.max_answer_len - 1]
            features.append({"prompt": record["prompt"], "image": record["image"],
                             "answer_ids": answer + [self.tokenizer.eos_token_id]})
        return features

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        """Right-padded batch: sequence tensors (ids, mask, mm_token_type_ids) padded, image tensors concatenated."""
        rows, image_parts = [], {}
        for f in features:
            encoded = processor_inputs(self.processor, [f["prompt"]], [f["image"]])
            width = encoded["input_ids"].shape
            answer = torch.tensor(f["answer_ids"], dtype=torch.long)
            row = {"labels": torch.cat([torch.full(width[1:], IGNORE_INDEX), answer])}
            for key, value in encoded.items():
                if value.shape == width:  # aligned with the tokens: extend over the answer
                    fill = answer if key == "input_ids" else torch.ones_like(answer) if key == "attention_mask" \
                        else torch.zeros_like(answer)
                    row[key] = torch.cat([value[0].long(), fill])
                else:
                    image_parts.setdefault(key, []).append(value)
            rows.append(row)
        pad_values = {"input_ids": self.tokenizer.pad_token_id, "labels": IGNORE_INDEX}
        longest = max(len(r["input_ids"]) for r in rows)
        batch = {key: torch.stack([torch.nn.functional.pad(r[key], (0, longest - len(r[key])),
                                                           value=pad_values.get(key, 0)) for r in rows])
                 for key in rows[0]}
        batch.update({key: torch.cat(parts) for key, parts in image_parts.items()})
        return batch
