"""Write tests/data/: the slices of the real benchmark data that the tests read, gzipped, with a manifest.

    python scripts/vendor_test_data.py --source /path/to/shared/data      # rewrites tests/data/*.gz + MANIFEST.json

Why a list and not a copy of everything: a clone must run `make test` without the full data (≤ 10 MB in
the repository), and the list below says which test needs which file. Whole files stay whole where a
test reads them whole (record counts, the authors'-scorer checks on full test sets and Llama-2 outputs);
MeetingBank, which the tests only open, is cut to its first records. tests/conftest.py unpacks the
result into a temporary directory when PIECE_SHARED_DATA and ../shared/data are both absent.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEST = ROOT / "tests" / "data"
TRACE_READ_WHOLE = ["C-STANCE", "FOMC", "ScienceQA", "NumGLUE-cm", "NumGLUE-ds", "20Minuten", "Py150"]
LLAMA2_OUTPUTS = ["C-STANCE", "FOMC", "ScienceQA", "NumGLUE-cm", "NumGLUE-ds", "20Minuten"]
VQA_TYPES = ["action", "commonsense", "count"]

# relative path -> (records kept: None = all, which tests read it)
SLICES: dict[str, tuple[int | None, str]] = {
    **{f"trace/{t}/{s}.json": (None, "test_trace_data (counts), test_benchmarks_e2e, test_official_protocol")
       for t in TRACE_READ_WHOLE for s in ("train", "eval", "test")},
    **{f"trace/{t}/test_llama2_7b_base.jsonl": (None, "test_scorers (the authors' scorer on full outputs)")
       for t in LLAMA2_OUTPUTS},
    "trace/MeetingBank/test.json": (16, "test_official_protocol (first 16); test_trace_data opens it"),
    "trace/MeetingBank/eval.json": (4, "test_trace_data opens it before refusing the missing train.json"),
    **{f"vqa_v2/{t}/{s}.json": (None, "test_vqa_data (counts), test_benchmarks_e2e, test_bad_input")
       for t in VQA_TYPES for s in ("train", "eval", "karpathy_test")},
    "flickr30k/flickr30k_test.json": (None, "test_vqa_data, test_benchmarks_e2e (caption probe)"),
    "humaneval/HumanEval.jsonl.gz": (None, "test_trace_data (equals the packaged copy)"),
    "humaneval/LICENSE": (None, "the HumanEval licence, kept beside it"),
}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def cut(data: bytes, name: str, keep: int) -> bytes:
    """The first `keep` records of a JSON list or JSON-lines file, in the source's own layout."""
    if name.endswith(".jsonl"):
        lines = [line for line in data.decode("utf-8").splitlines() if line.strip()]
        return ("\n".join(lines[:keep]) + "\n").encode("utf-8")
    return json.dumps(json.loads(data)[:keep], ensure_ascii=False, indent=1).encode("utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=ROOT.parent / "shared" / "data")
    args = parser.parse_args()
    manifest = {}
    for rel, (keep, readers) in SLICES.items():
        source = args.source / rel
        data = source.read_bytes()
        entry = {"source_sha256": sha256(data), "source_bytes": len(data), "kept": "all" if keep is None else keep,
                 "read_by": readers}
        if keep is not None:
            data = cut(data, rel, keep)
        if rel.endswith((".gz", "LICENSE")):
            target = DEST / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
        else:
            target = DEST / (rel + ".gz")
            target.parent.mkdir(parents=True, exist_ok=True)
            # mtime=0: the same input gives the same bytes, so a rerun changes nothing in git
            with open(target, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, compresslevel=9) as out:
                out.write(data)
        entry["sha256"] = sha256(data)
        entry["stored_bytes"] = target.stat().st_size
        manifest[rel] = entry
    (DEST / "MANIFEST.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    total = sum(e["stored_bytes"] for e in manifest.values())
    print(f"{len(manifest)} files, {total / 1e6:.2f} MB stored in {DEST.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
