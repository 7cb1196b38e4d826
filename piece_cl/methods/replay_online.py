"""Replay-online: a small sample of every past task mixed into every batch of the current task.

The past samples (`fraction` of each past task, as in Replay) are spread evenly through the current
task's records, so each stretch of a batch's length holds its share (exactly so with
`trainer.shuffle=false`; on average under the engine's shuffle). The authors used the first 10% of
each past task (protocol=official_code).

Cost: memory of the sampled records only; time × (1 + past samples / task samples) per epoch.
"""
from __future__ import annotations

from piece_cl.methods.base import register_method
from piece_cl.methods.replay import Replay


@register_method
class ReplayOnline(Replay):
    name = "replay_online"

    @property
    def mixes_into_task(self) -> bool:
        return True
