"""Score one task: generate answers for its test prompts, then apply the task's scorer."""
from __future__ import annotations

from piece_cl.evaluation.generation import generate
from piece_cl.evaluation.scorers import all_metrics, reference_of
from piece_cl.evaluation.sharding import Shard


def evaluate_task(model, tokenizer, task, eval_cfg, shard: Shard | None = None
                  ) -> tuple[float, dict[str, float], list[dict]]:
    """(score 0..100, all metrics, per-item predictions) on `task.test`; `shard`: this rank's share."""
    prompts = [r["prompt"] for r in task.test]
    references = [reference_of(r) for r in task.test]  # VQA: 10 answers; captions: 5
    predictions = generate(
        model, tokenizer, prompts, max_new_tokens=task.max_new_tokens, batch_size=int(eval_cfg.batch_size),
        do_sample=bool(eval_cfg.do_sample), top_k=eval_cfg.top_k, top_p=eval_cfg.top_p,
        temperature=eval_cfg.temperature, seed=eval_cfg.seed, max_prompt_len=eval_cfg.get("max_prompt_len"),
        images=[r["image"] for r in task.test] if any("image" in r for r in task.test) else None, shard=shard,
    )
    metrics = all_metrics(task.metric, predictions, references)
    items = [{"task": task.name, "prompt": p, "prediction": y, "reference": r}
             for p, y, r in zip(prompts, predictions, references)]
    return metrics["score"], metrics, items
