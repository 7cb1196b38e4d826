"""Flickr30K captioning: the multimodal benchmark's general-ability probe (mean of ROUGE-L and BLEU)."""
from __future__ import annotations

from dataclasses import dataclass

from piece_cl.evaluation.generation import generate_for_eval
from piece_cl.evaluation.scorers import score
from piece_cl.evaluation.sharding import Shard


@dataclass
class CaptionProbe:
    """Captions decoded as `eval.*` says (greedy, or the authors' sampler), scored against five references."""

    name: str
    records: list[dict]  # {"prompt", "image", "references"} (data/vqa.py load_flickr30k)
    max_new_tokens: int = 128
    missing_images: int = 0

    def evaluate(self, model, tokenizer, gen_cfg, shard: Shard | None = None) -> tuple[float, list[dict]]:
        """(score on 0..100, one record per image with its caption); `shard`: this rank's share."""
        predictions = generate_for_eval(model, tokenizer, [r["prompt"] for r in self.records], gen_cfg,
                                        self.max_new_tokens, images=[r["image"] for r in self.records], shard=shard,
                                        cut_prompts=False)
        references = [r["references"] for r in self.records]
        items = [{"image": r["image"], "prediction": p, "references": r["references"]}
                 for r, p in zip(self.records, predictions)]
        return score("caption", predictions, references), items
