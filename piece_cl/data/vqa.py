"""Records of VQA v2 split by question type (VQACL) and of Flickr30K captioning, with their images.

The authors' records carry absolute `pic_path`s on their machine; we keep only the file name and
look it up under `paths.coco_root` (directly, or in the `train2014`/`val2014` folder its name
states). Test questions come from `karpathy_test.json`, with all ten human answers for the
official VQA accuracy.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from piece_cl.data.records import load_json_any
from piece_cl.errors import PieceError

CAPTION_PROMPT = "Give a short description of the image."
_COCO_SPLIT = re.compile(r"(train|val|test)\d{4}")
FLICKR_IMAGE_FOLDERS = ("flickr30k-images", "images")


@dataclass
class ImageResolver:
    """Maps a file name to an image under `root`; counts misses when told to skip them."""

    root: Path
    config_key: str
    skip_missing: bool = False
    subfolders: tuple[str, ...] = ()
    missing: list[str] = field(default_factory=list)

    def candidates(self, name: str) -> list[Path]:
        split = _COCO_SPLIT.search(name)  # COCO_val2014_000000262175.jpg lives in val2014/
        folders = [self.root, *(self.root / sub for sub in self.subfolders)]
        if split:
            folders.append(self.root / split.group())
        return [folder / name for folder in folders]

    def resolve(self, original: str, record: str) -> Path | None:
        """The image file of `original`; `record` ("<file>: record <i>") names the record that wants it."""
        name = Path(original).name
        for candidate in self.candidates(name):
            if candidate.is_file():
                return candidate
        if not self.skip_missing:
            raise PieceError(f"{record}: image {name} not found under {self.config_key} = {self.root} "
                             f"(set benchmark.missing_images=skip to skip and count missing images)")
        self.missing.append(name)
        return None


def with_images(numbered: list[tuple[int, dict]], resolver: ImageResolver, source: Path) -> list[dict]:
    """Records (with their index in `source`) given their image path under "image"; those without an
    image are dropped (skip mode). Checked at loading, so a missing image stops a run before it trains."""
    kept = []
    for index, record in numbered:
        image = resolver.resolve(record["pic_path"], f"{source}: record {index}")
        if image is not None:
            kept.append({**record, "image": str(image)})
    return kept


def top_answer(label: dict[str, float], answers: list[str]) -> str:
    """The gold answer: the highest-scoring human answer (VQACL's `label`), else the most frequent."""
    if label:
        return max(label, key=label.get)
    return max(answers, key=answers.count)


def karpathy_test_records(path: Path) -> list[dict]:
    """Test questions with their ten human answers under "references" (scored by the "vqa" rule)."""
    records = []
    for index, item in enumerate(load_json_any(path)):
        try:
            answers = [a["answer"] for a in item["answers"]]
            records.append({
                "prompt": item["sent"],
                "answer": top_answer(item.get("label") or {}, answers),
                "references": answers,
                "pic_path": item["img_id"] + ".jpg",
                "question_id": item["question_id"],
            })
        except (KeyError, TypeError, ValueError):
            raise PieceError(f"{path}: record {index} lacks sent / answers / img_id / question_id") from None
    return records


def load_flickr30k(path: Path, resolver: ImageResolver, n_images: int | None = None) -> list[dict]:
    """Karpathy test split: one record per image, the five captions under "references"."""
    records = []
    for index, item in enumerate(load_json_any(path)[:n_images]):
        if not isinstance(item, dict) or not isinstance(item.get("image_name"), str) or not item.get("captions"):
            raise PieceError(f"{path}: record {index} lacks image_name / captions")
        image = resolver.resolve(item["image_name"], f"{path}: record {index}")
        if image is not None:
            records.append({"prompt": CAPTION_PROMPT, "answer": item["captions"][0],
                            "references": list(item["captions"]), "image": str(image)})
    return records
