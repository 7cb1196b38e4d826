"""Score one task: generate answers for its test prompts, then apply the task's scorer."""
from __future__ import annotations

from piece_cl.evaluation.generation import generate_for_eval
from piece_cl.evaluation.scorers import all_metrics, reference_of
from piece_cl.evaluation.sharding import Shard


def evaluate_task(model, tokenizer, task, eval_cfg, shard: Shard | None = None
                  ) -> tuple[float, dict[str, float], list[dict]]:
    """(score 0..100, all metrics, per-item predictions) on `task.test`; `shard`: this rank's share."""
    prompts = [r["prompt"] for r in task.test]
    references = [reference_of(r) for r in task.test]  # VQA: 10 answers; captions: 5
    predictions = generate_for_eval(
        model, tokenizer, prompts, eval_cfg, task.max_new_tokens, shard=shard,
        images=[r["image"] for r in task.test] if any("image" in r for r in task.test) else None,
    )
    metrics = all_metrics(task.metric, predictions, references)
    items = [{"task": task.name, "prompt": p, "prediction": y, "reference": r}
             for p, y, r in zip(prompts, predictions, references)]
    return metrics["score"], metrics, items
