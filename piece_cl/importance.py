"""Parameter importance for PIECE: exact per-sample Fisher (Eq. 4) and S (Eq. 10), and a global top-k.

Per-sample gradients come from per-layer hooks (as Opacus/BackPACK do): one batched forward and
backward per chunk of samples, with eligible weights excluded from autograd; each eligible
``nn.Linear`` forms its per-sample weight gradients ``g_n = D_n^T X_n`` from its saved input ``X``
and output gradient ``D`` and folds them into running sums of ``g`` and ``g^2`` before the next
layer's gradient arrives. That costs about what the ordinary weight-gradient matmul would, so the
whole estimate stays close to one plain forward+backward, and memory is bounded by the chunk size.
Other modules owning eligible parameters (norm weights, ...) take a small ``torch.func`` path.

``select_top_k`` never concatenates the scores: it finds the k-th largest value by a two-pass radix
select on the float bit patterns (16-bit digits, histograms per block), then gathers, so its extra
memory is one block plus the selected indices.

Across N data-parallel ranks (any initialised process group) chunk j is estimated on rank j mod N and
the additive sums Σg, Σg² are combined, so the statistics are one process's up to summation order.
With ``shard_moments`` each rank stores the sums only for the entries it owns (a contiguous 1/N of every
tensor): each layer's per-chunk sums are reduced to their owners as the hooks fire, the radix select
all-reduces its histograms, and the O(k) selected indices are shared, so every rank holds the same mask
while the moments cost ≈ 1/N per rank. ``moments_device="cpu"`` keeps the sums in host memory (one GPU).
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from piece_cl.errors import PieceError
from piece_cl.evaluation.sharding import Shard
from piece_cl.scope import exclude_patterns

# Regular expressions searched in parameter names. Embeddings are excluded as in the authors' code;
# lm_head stays eligible when untied (a tied lm_head shares the embedding's name and is excluded with it);
# vision towers of multimodal models are excluded.
DEFAULT_EXCLUDE: tuple[str, ...] = exclude_patterns()  # piece_cl/scope.py: embeddings, the vision side

# ξ of Eq. 10 in squared-gradient units: it only guards against 0/0 and damps entries whose RMS
# gradient is far below 1e-4, so S ranks by consistency of sign rather than by noise-level gradients.
DEFAULT_XI = 1e-8

KINDS = ("fisher", "s")
# Storage dtype of the running sums. "bfloat16" is the authors' accumulation (paper notes §3): once Σg² ≫ 1
# rounds away the +ξ and many small additions round to nothing, so S drifts towards |Σg|/sqrt(Σg²) noise.
ACCUMULATE = {"float32": None, "bfloat16": torch.bfloat16}
_BATCH_KEYS = {"input_ids", "labels", "attention_mask"}
# Largest per-sample gradient buffer formed at once for one Linear layer (bytes); bigger layers
# are processed a few samples at a time, so lm_head of a large vocabulary does not blow memory up.
_PER_SAMPLE_BUFFER_BYTES = 1 << 28
# Entries per block in select_top_k: the only scratch memory besides the selected indices.
_BLOCK = 1 << 20
_DIGIT_BITS = 16


def eligible_parameters(
    model: nn.Module, exclude: Sequence[str] = DEFAULT_EXCLUDE, include: Sequence[str] | None = None
) -> list[tuple[str, nn.Parameter]]:
    """Parameters that may be selected: names matching any `include` pattern (all when None), minus `exclude`."""
    chosen = []
    for name, param in model.named_parameters():
        if include is not None and not any(re.search(p, name) for p in include):
            continue
        if any(re.search(p, name) for p in exclude):
            continue
        chosen.append((name, param))
    return chosen


def moment_bytes(n_eligible: int, world: int = 1, kind: str = "s", accumulate: str = "float32",
                 sharded: bool = True, largest: int = 0) -> int:
    """Bytes of running sums one rank holds for `n_eligible` entries: 2 sums for S, 1 for Fisher.

    Sharded over `world` ranks each rank owns ceil(n / world) entries of every tensor (counted here on the
    total); `largest` (entries of the biggest eligible tensor) adds the per-layer compute-dtype buffer that
    is reduced to the owners (or copied to the host) as a layer's hooks fire. One definition, used by the
    memory plan and the benchmark.
    """
    if kind not in KINDS:
        raise PieceError(f"importance kind must be one of {KINDS}, got {kind!r}")
    sums = 2 if kind == "s" else 1
    store = 2 if ACCUMULATE[_accumulate(accumulate)] is torch.bfloat16 else 4
    owned = -(-int(n_eligible) // max(1, int(world))) if sharded else int(n_eligible)
    return sums * (owned * store + int(largest) * 4)


def _accumulate(name: str) -> str:
    if name not in ACCUMULATE:
        raise PieceError(f"method.importance.accumulate must be one of {tuple(ACCUMULATE)}, got {name!r}")
    return name


def _span(numel: int, shard: Shard) -> tuple[int, int]:
    """The contiguous flat entries of a tensor that `shard` owns: ceil(numel / world) each, the last shorter."""
    per = -(-numel // shard.world)
    lo = min(shard.rank * per, numel)
    return lo, min(lo + per, numel)


def _reduce_to_owners(flat: Tensor, shard: Shard) -> Tensor:
    """Sum `flat` over the ranks into each owner's span; returns this rank's summed span (others undefined)."""
    n = flat.numel()
    per = -(-n // shard.world)
    if dist.get_backend() != "gloo":  # one reduce_scatter (NCCL); gloo has none, so one reduce per owner
        padded = torch.zeros(per * shard.world, dtype=flat.dtype, device=flat.device)
        padded[:n] = flat
        out = torch.empty(per, dtype=flat.dtype, device=flat.device)
        dist.reduce_scatter_tensor(out, padded)
        lo, hi = _span(n, shard)
        return out[: hi - lo]
    for owner in range(shard.world):
        lo, hi = _span(n, Shard(owner, shard.world))
        if hi > lo:
            dist.reduce(flat[lo:hi], dst=owner)
    lo, hi = _span(n, shard)
    return flat[lo:hi]


class _Moments:
    """Running Σ g and Σ g² of one parameter: the whole tensor, or the span this rank owns when sharded.

    The sums are formed in the compute dtype (≥ fp32) on the parameter's device. When they are stored
    there in that dtype and not sharded, chunks fold straight in; otherwise one layer's chunk sums wait
    in `pending` until `flush` reduces them to their owners and/or moves them to the store (host, bf16).
    """

    def __init__(self, param: Tensor, need_sum: bool, shard: Shard | None, device: torch.device | None,
                 store: torch.dtype | None):
        self.compute = torch.promote_types(param.dtype, torch.float32)
        self.shard = shard
        self.span = _span(param.numel(), shard) if shard is not None else (0, param.numel())
        device = torch.device(device) if device is not None else param.device
        dtype = store or self.compute
        shape = (self.span[1] - self.span[0],) if shard is not None else param.shape
        pin = device.type == "cpu" and param.device.type == "cuda"

        def zeros() -> Tensor:
            return torch.zeros(shape, dtype=dtype, device=device, pin_memory=pin)

        self.sq = zeros()
        self.total = zeros() if need_sum else None
        self.direct = shard is None and device == param.device and dtype == self.compute
        self.pending: list[Tensor | None] | None = None

    def add(self, per_group: Tensor) -> None:
        """Fold gradients of shape (groups, *param.shape) in; squares in place to save a buffer."""
        if self.direct:
            if self.total is not None:
                self.total += per_group.sum(0)
            self.sq += per_group.mul_(per_group).sum(0)
            return
        total = per_group.sum(0) if self.total is not None else None
        sq = per_group.mul_(per_group).sum(0)
        if self.pending is None:
            self.pending = [sq, total]
        else:
            self.pending[0] += sq
            if total is not None:
                self.pending[1] += total

    def flush(self) -> None:
        """Move this chunk's pending sums into the store (a collective when sharded: every rank calls it)."""
        if self.direct or self.pending is None:
            return
        for part, store in zip(self.pending, (self.sq, self.total)):
            if store is None:
                continue
            flat = part.reshape(-1)
            owned = _reduce_to_owners(flat, self.shard) if self.shard is not None else flat.view(store.shape)
            store.add_(owned.to(store.device, store.dtype))
        self.pending = None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.sq, self.total) if t is not None)

    def all_reduce(self) -> None:
        """Replicated data parallel: every rank's sums become the sums over all ranks."""
        for store in (self.sq, self.total):
            if store is not None:
                dist.all_reduce(store)


class _PerSampleHooks:
    """Forward/backward hooks that turn one chunk's backward into per-sample gradient moments."""

    def __init__(self, model: nn.Module, eligible: list[tuple[str, nn.Parameter]], need_sum: bool, per_sample: bool,
                 shard: Shard | None = None, device: torch.device | None = None, store: torch.dtype | None = None):
        self.per_sample = per_sample
        self.moments = {name: _Moments(param, need_sum, shard, device, store) for name, param in eligible}
        self.owned = _owners(model, eligible)  # module -> [(attribute, name)]
        self.inputs: dict[nn.Module, tuple] = {}
        self.pending: list[tuple[nn.Module, tuple, dict, Tensor]] = []
        self.replaying = False  # functional_call in _generic re-runs modules: hooks must stay quiet
        self.handles = []
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if embeddings is None:
            raise PieceError("importance needs a model with get_input_embeddings() (a transformers model)")
        # Weights are out of autograd, so the graph must start at the embedding output.
        self.handles.append(embeddings.register_forward_hook(lambda m, a, out: out.requires_grad_(True)))
        for module in self.owned:
            self.handles.append(module.register_forward_hook(self._on_forward, with_kwargs=True))

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()

    def start_chunk(self) -> None:
        self.inputs.clear()

    def _on_forward(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        if self.replaying:
            return
        if module in self.inputs:
            raise PieceError(
                f"module {type(module).__name__} ran twice in one forward; per-sample importance needs each "
                "eligible parameter used once (disable gradient checkpointing / weight sharing)"
            )
        if not isinstance(output, Tensor) or not output.requires_grad:
            raise PieceError(f"module {type(module).__name__} with eligible parameters returns no differentiable tensor")
        self.inputs[module] = (args, kwargs)
        output.register_hook(lambda d, m=module: self._on_output_grad(m, d))

    def _on_output_grad(self, module: nn.Module, d: Tensor) -> None:
        args, kwargs = self.inputs[module]
        self.inputs[module] = ((), {})  # drop the activation as soon as it is used
        if isinstance(module, nn.Linear):
            self._linear(module, args[0].detach(), d)
        else:  # torch.func inside the autograd engine is fragile: finish after backward
            self.pending.append((module, args, kwargs, d))

    def finish_chunk(self) -> None:
        self.replaying = True
        try:
            for module, args, kwargs, d in self.pending:
                self._generic(module, args, kwargs, d)
        finally:
            self.replaying = False
            self.pending.clear()

    def _linear(self, module: nn.Linear, x: Tensor, d: Tensor) -> None:
        rows = x.shape[0]
        x = x.reshape(rows, -1, x.shape[-1])
        d = d.reshape(rows, -1, d.shape[-1])
        for attr, name in self.owned[module]:
            moments = self.moments[name]
            acc = moments.compute
            if not self.per_sample:  # one group: the whole chunk (the authors' mini-batch gradient)
                dd = d.reshape(-1, d.shape[-1]).to(acc)
                g = dd.T @ x.reshape(-1, x.shape[-1]).to(acc) if attr == "weight" else dd.sum(0)
                moments.add(g.unsqueeze(0))
            elif attr == "bias":
                moments.add(d.to(acc).sum(1))
            else:
                step = max(1, _PER_SAMPLE_BUFFER_BYTES // (module.weight.numel() * acc.itemsize))
                for lo in range(0, rows, step):
                    moments.add(torch.bmm(d[lo : lo + step].to(acc).transpose(1, 2), x[lo : lo + step].to(acc)))
            moments.flush()

    def _generic(self, module: nn.Module, args: tuple, kwargs: dict, d: Tensor) -> None:
        """Per-sample gradients of a module's own parameters by vmap over the batch of <d_n, f(x_n)>.

        Assumes the first positional input carries the batch; other inputs are passed unbatched.
        """
        owned = self.owned[module]
        acc = self.moments[owned[0][1]].compute
        params = {attr: getattr(module, attr).detach().to(acc) for attr, _ in owned}
        x, rest = args[0].detach().to(acc), args[1:]

        def contribution(p: dict, x_n: Tensor, d_n: Tensor) -> Tensor:
            out = functional_call(module, p, (x_n.unsqueeze(0), *rest), kwargs)
            return (out.to(acc) * d_n.unsqueeze(0)).sum()

        with torch.enable_grad():
            grads = vmap(grad(contribution), in_dims=(None, 0, 0))(params, x, d.to(acc))
        for attr, name in owned:
            g = grads[attr]
            self.moments[name].add(g if self.per_sample else g.sum(0, keepdim=True))
            self.moments[name].flush()


def _owners(model: nn.Module, eligible: list[tuple[str, nn.Parameter]]) -> dict[nn.Module, list[tuple[str, str]]]:
    """Map each module to its own eligible parameters; a parameter used by two modules is refused."""
    names = {id(p): n for n, p in eligible}
    owners: dict[nn.Module, list[tuple[str, str]]] = {}
    seen: dict[int, str] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for attr, param in module.named_parameters(recurse=False):
            if id(param) not in names:
                continue
            if id(param) in seen and seen[id(param)] != module_name:
                raise PieceError(
                    f"parameter {names[id(param)]} is shared by {seen[id(param)]} and {module_name}; "
                    "per-sample importance of tied parameters is not supported (exclude it)"
                )
            seen[id(param)] = module_name
            owners.setdefault(module, [])
            if (attr, names[id(param)]) not in owners[module]:
                owners[module].append((attr, names[id(param)]))
    missing = set(names.values()) - {n for pairs in owners.values() for _, n in pairs}
    if missing:
        raise PieceError(f"eligible parameters not owned by any module of the model: {sorted(missing)}")
    return owners


def _chunks(batches: Iterable[Mapping[str, Tensor]], size: int | None) -> Iterator[dict]:
    """Rows of each batch in chunks of `size` (None: the batch as is), trimmed after the last answer token.

    A chunk without answer tokens keeps its first column, so a rank can still run it (with zero gradients)
    in step with the others."""
    for batch in batches:
        extra = set(batch) - _BATCH_KEYS
        if extra or "input_ids" not in batch or "labels" not in batch:
            raise PieceError(f"importance batches hold input_ids, labels and optionally attention_mask; got {sorted(batch)}")
        rows = batch["input_ids"].shape[0]
        for lo in range(0, rows, size or rows):
            chunk = {k: v[lo : lo + (size or rows)] for k, v in batch.items()}
            answer = (chunk["labels"] != -100).any(0).nonzero()
            # Under causal attention positions after the last label cannot change the loss: drop them.
            length = int(answer.max()) + 1 if answer.numel() else 1
            yield {k: v[:, :length] for k, v in chunk.items()}


def _my_chunks(chunks: Iterator[dict], shard: Shard) -> Iterator[tuple[dict, bool, list[int]]]:
    """(chunk, mine, rows of the round's chunks) in rounds of `world` chunks: chunk j of a round is rank j's;
    a rank without one in the last round re-runs the round's first with zero weight (mine False), so
    every rank makes the same collective calls."""
    while True:
        round_ = [chunk for _, chunk in zip(range(shard.world), chunks)]
        if not round_:
            return
        rows = [chunk["input_ids"].shape[0] for chunk in round_]
        yield (round_[shard.rank], True, rows) if shard.rank < len(round_) else (round_[0], False, rows)


def _answer_loss(model: nn.Module, chunk: dict, reduction: str, per_sample: bool) -> Tensor:
    """Negative answer log-likelihood of the chunk, shaped so its gradient is Σ over groups of group gradients."""
    kwargs = {"attention_mask": chunk["attention_mask"]} if "attention_mask" in chunk else {}
    logits = model(input_ids=chunk["input_ids"], **kwargs).logits[:, :-1]
    targets = chunk["labels"][:, 1:]
    acc = torch.promote_types(logits.dtype, torch.float32)
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).to(acc), targets.reshape(-1), reduction="none")
    nll = nll.view(targets.shape)
    counted = (targets != -100).sum(1)
    if reduction == "sum":
        return nll.sum()
    if per_sample:
        return (nll.sum(1) / counted.clamp_min(1)).sum()
    return nll.sum() / counted.sum().clamp_min(1)


@dataclass
class ShardedScores:
    """Scores of the entries each rank owns: `local[name]` is the flat span starting at `offsets[name]`."""

    local: dict[str, Tensor]
    offsets: dict[str, int]
    shapes: dict[str, torch.Size]
    shard: Shard

    def numel(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes.values())

    def gather(self) -> dict[str, Tensor]:
        """The whole score tensors on every rank (a collective), for statistics every rank needs whole."""
        whole = {}
        for name, shape in self.shapes.items():
            n = math.prod(shape)
            per = -(-n // self.shard.world)
            mine = torch.zeros(per, dtype=self.local[name].dtype, device=self.local[name].device)
            mine[: self.local[name].numel()] = self.local[name]
            parts = [torch.empty_like(mine) for _ in range(self.shard.world)]
            dist.all_gather(parts, mine)
            whole[name] = torch.cat(parts)[:n].view(shape)
        return whole


def whole_scores(scores: "Mapping[str, Tensor] | ShardedScores") -> dict[str, Tensor]:
    """`estimate`'s result as whole tensors on this rank, however it was computed."""
    return scores.gather() if isinstance(scores, ShardedScores) else dict(scores)


def estimate(
    model: nn.Module,
    batches: Iterable[Mapping[str, Tensor]],
    kind: str,
    xi: float = DEFAULT_XI,
    granularity: str = "sample",
    chunk_size: int = 8,
    eligible: list[tuple[str, nn.Parameter]] | None = None,
    reduction: str = "sum",
    xi_on_sums: bool = False,
    shard: Shard | None = None,
    shard_moments: bool = True,
    moments_device: str | torch.device | None = None,
    accumulate: str = "float32",
    work: dict | None = None,
) -> "dict[str, Tensor] | ShardedScores":
    """Importance of every eligible parameter on the model as it stands: fp32, same shapes, eligible order.

    kind "fisher": F = mean_n g_n²  (Eq. 4).  kind "s": S = |mean_n g_n| / sqrt(mean_n g_n² + ξ)  (Eq. 10);
    with ``xi_on_sums`` S = |Σ g_n| / sqrt(Σ g_n² + ξ) (the authors' code, with ξ = 1).
    g_n is the gradient of the answer log-likelihood of sample n (``granularity="sample"``, the paper)
    or of batch n as given by `batches` (``"batch"``, the authors' code). ``reduction="sum"`` is log p(y|x),
    the sum over answer tokens; ``"mean"`` averages over answer tokens (per sample, or per batch for
    "batch" granularity: the authors' token-mean cross-entropy). Batches are right padded with labels -100
    on prompt and padding. Runs in eval mode without touching ``.grad`` or the weights.

    `shard` (default: the process group, if any) splits the chunks across ranks; every rank must pass
    the same `batches`. With more than one rank and ``shard_moments`` the result is a `ShardedScores`
    (each rank's own entries; `select_top_k` takes it as it is, `whole_scores` gathers it), otherwise
    whole tensors on every rank. ``moments_device`` stores the sums elsewhere ("cpu": host memory,
    pinned under CUDA); ``accumulate="bfloat16"`` stores them in bf16 as the authors did. `work`, when
    given, receives the sample counts and the bytes of sums this rank held.
    """
    if kind not in KINDS:
        raise PieceError(f"importance kind must be one of {KINDS}, got {kind!r}")
    if granularity not in ("sample", "batch"):
        raise PieceError(f"importance granularity must be 'sample' or 'batch', got {granularity!r}")
    if reduction not in ("sum", "mean"):
        raise PieceError(f"importance reduction must be 'sum' or 'mean', got {reduction!r}")
    if not xi > 0:
        raise PieceError(f"importance xi must be > 0 (paper, Eq. 10), got {xi}")
    if chunk_size < 1:
        raise PieceError(f"importance chunk_size must be >= 1, got {chunk_size}")
    store = ACCUMULATE[_accumulate(accumulate)]
    eligible = eligible_parameters(model) if eligible is None else list(eligible)
    if not eligible:
        raise PieceError("no eligible parameters for importance (check the exclude/include patterns)")
    shard = Shard.current() if shard is None else shard
    sharded = shard_moments and shard.world > 1
    per_sample = granularity == "sample"
    device = eligible[0][1].device
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    hooks = _PerSampleHooks(model, eligible, need_sum=kind == "s", per_sample=per_sample,
                            shard=shard if sharded else None, device=moments_device, store=store)
    groups = here = 0
    try:
        model.eval()
        for p in flags:
            p.requires_grad_(False)
        with torch.enable_grad():
            for chunk, mine, rows in _my_chunks(_chunks(batches, chunk_size if per_sample else None), shard):
                groups += sum(rows) if per_sample else len(rows)
                here += (chunk["input_ids"].shape[0] if per_sample else 1) if mine else 0
                if shard.world == 1 and not bool((chunk["labels"] != -100).any()):
                    continue  # no answer token anywhere: zero gradients, still counted
                hooks.start_chunk()
                chunk = {k: v.to(device) for k, v in chunk.items()}
                loss = _answer_loss(model, chunk, reduction, per_sample)
                (loss if mine else loss * 0.0).backward()  # other ranks wait for this rank's reductions
                hooks.finish_chunk()
    finally:
        hooks.close()
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
    if groups == 0:
        raise PieceError("importance needs at least one sample; the batches were empty")
    if work is not None:
        work.update(samples=groups, samples_here=here, world=shard.world, sharded=sharded,
                    moment_bytes=sum(m.nbytes() for m in hooks.moments.values()))
    if shard.world > 1 and not sharded:
        for moments in hooks.moments.values():
            moments.all_reduce()
    scores = {name: _score(hooks.moments[name], kind, xi, groups, xi_on_sums) for name, _ in eligible}
    if not sharded:
        return scores
    return ShardedScores(scores, {name: hooks.moments[name].span[0] for name, _ in eligible},
                         {name: param.shape for name, param in eligible}, shard)


def _score(moments: _Moments, kind: str, xi: float, groups: int, xi_on_sums: bool) -> Tensor:
    """Scores in the sums' own dtype (in bf16, as the authors: Σg² + 1 rounds to 1 below 2⁻⁸), as fp32."""
    scale = 1.0 if (xi_on_sums and kind == "s") else 1.0 / groups
    second = moments.sq.mul_(scale)
    if kind == "fisher":
        return second.float()
    return moments.total.mul_(scale).abs_().div_(second.add_(xi).sqrt_()).float()


def top_k_size(ratio: float, total: int, entries: int) -> int:
    """k = floor(ratio × total), computed from the decimal ratio exactly; 1 ≤ k ≤ entries or a PieceError."""
    if not 0 < ratio <= 1:
        raise PieceError(f"top-k ratio must be in (0, 1], got {ratio}")
    k = math.floor(Fraction(str(ratio)) * total)
    if k == 0:
        raise PieceError(f"top-k selects nothing: method.ratio {ratio} x {total} parameters rounds down to 0; "
                         "raise method.ratio")
    if k > entries:
        raise PieceError(f"top-k asks for {k} entries (method.ratio {ratio} x {total} parameters) but only {entries} "
                         "are eligible; lower method.ratio")
    return k


def select_top_k(scores: "Mapping[str, Tensor] | ShardedScores", ratio: float,
                 total: int | None = None) -> dict[str, Tensor]:
    """The k = floor(ratio × total) largest scores over all tensors: name -> sorted int64 flat indices.

    Scores must be non-negative fp32 without NaN. Ties at the threshold go to the smallest
    (tensor name, flat index) in sorted name order, so the result does not depend on dict order.
    Tensors with no selected entry are omitted. k is computed from the decimal ratio exactly.
    `ShardedScores` give the same selection on every rank (a collective: every rank calls it).
    """
    if isinstance(scores, ShardedScores):
        return _select_sharded(scores, ratio, total)
    names = sorted(scores)
    entries = sum(scores[n].numel() for n in names)
    k = top_k_size(ratio, entries if total is None else total, entries)
    _check_float32(scores, names)
    high_hist = _histogram(scores, names, lambda keys: keys >> _DIGIT_BITS, validate=True)
    high, above = _digit_holding_kth(high_hist, k, 0)
    low_hist = _histogram(scores, names, lambda keys: keys[(keys >> _DIGIT_BITS) == high] & _LOW_MASK)
    low, above = _digit_holding_kth(low_hist, k, above)
    return _gather(scores, names, (high << _DIGIT_BITS) | low, ties=k - above)


_LOW_MASK = (1 << _DIGIT_BITS) - 1


def _check_float32(scores: Mapping[str, Tensor], names: list[str]) -> None:
    for name in names:
        if scores[name].dtype != torch.float32:
            raise PieceError(f"top-k scores must be float32; {name} is {scores[name].dtype}")


def _select_sharded(scores: ShardedScores, ratio: float, total: int | None) -> dict[str, Tensor]:
    """The radix select of `select_top_k` on each rank's own entries, with its histograms and tie counts
    summed over the ranks; each rank picks its own entries, then the O(k) index lists are shared."""
    shard, local, names = scores.shard, scores.local, sorted(scores.shapes)
    entries = scores.numel()
    k = top_k_size(ratio, entries if total is None else total, entries)
    _check_float32(local, names)
    device = local[names[0]].device
    invalid = torch.tensor([sum(not bool((t >= 0).all()) for t in local.values())], device=device)
    dist.all_reduce(invalid)  # every rank raises together rather than leaving the others in a collective
    if int(invalid):
        raise PieceError("top-k scores must be non-negative and not NaN; some are not")
    high_hist = _histogram(local, names, lambda keys: keys >> _DIGIT_BITS, device=device)
    dist.all_reduce(high_hist)
    high, above = _digit_holding_kth(high_hist, k, 0)
    low_hist = _histogram(local, names, lambda keys: keys[(keys >> _DIGIT_BITS) == high] & _LOW_MASK, device=device)
    dist.all_reduce(low_hist)
    low, above = _digit_holding_kth(low_hist, k, above)
    threshold = (high << _DIGIT_BITS) | low
    # Ties go in (name, flat index) order; a tensor's spans ascend with the rank, so the quota of
    # (name, rank) is what the ties before it in (name, rank) order leave.
    tied = torch.zeros(len(names), dtype=torch.long, device=device)
    for name, _, keys in _blocks(local, names):
        tied[names.index(name)] += int((keys == threshold).sum())
    table = _all_gather(tied, shard)  # world x names
    order = table.T.reshape(-1)
    quota = (k - above - (order.cumsum(0) - order)).clamp_min(0).minimum(order).view(len(names), shard.world)
    mine = _gather(local, names, threshold, ties=dict(zip(names, quota[:, shard.rank].tolist())), base=scores.offsets)
    return _share(mine, names, shard, device)


def _all_gather(tensor: Tensor, shard: Shard) -> Tensor:
    parts = [torch.empty_like(tensor) for _ in range(shard.world)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.stack(parts)


def _share(mine: dict[str, Tensor], names: list[str], shard: Shard, device: torch.device) -> dict[str, Tensor]:
    """Every rank's selected indices on every rank, per name in rank (= index) order."""
    counts = torch.tensor([mine[n].numel() if n in mine else 0 for n in names], dtype=torch.long, device=device)
    table = _all_gather(counts, shard)
    width = int(table.sum(1).max())
    flat = torch.zeros(width, dtype=torch.long, device=device)
    ours = [mine[n] for n in names if n in mine]
    if ours:
        joined = torch.cat(ours)
        flat[: joined.numel()] = joined
    everyone = _all_gather(flat, shard)
    parts: dict[str, list[Tensor]] = {}
    for rank in range(shard.world):
        pieces = everyone[rank][: int(table[rank].sum())].split(table[rank].tolist())
        for name, piece in zip(names, pieces):
            if piece.numel():
                parts.setdefault(name, []).append(piece)
    return {name: torch.cat(parts[name]) for name in names if name in parts}


def _blocks(scores: Mapping[str, Tensor], names: list[str], validate: bool = False,
            base: Mapping[str, int] | None = None) -> Iterator[tuple[str, int, Tensor]]:
    """(name, offset, int32 keys) per block; for non-negative floats the bit pattern orders like the value.

    `base` adds each tensor's starting flat index (a rank's span of a sharded tensor)."""
    for name in names:
        flat = scores[name].detach().reshape(-1)
        start = base[name] if base is not None else 0
        for lo in range(0, flat.numel(), _BLOCK):
            block = flat[lo : lo + _BLOCK]
            if validate and not bool((block >= 0).all()):  # False for NaN and negatives, True for -0.0
                raise PieceError(f"top-k scores must be non-negative and not NaN; {name} is not")
            yield name, start + lo, block.view(torch.int32).clamp_min(0)  # -0.0 has the sign bit: count it as 0.0


def _histogram(scores, names, digit, validate: bool = False, device: torch.device | None = None) -> Tensor:
    counts = torch.zeros(1 << _DIGIT_BITS, dtype=torch.long, device=device) if device is not None else None
    for _, _, keys in _blocks(scores, names, validate):
        block_counts = torch.bincount(digit(keys), minlength=1 << _DIGIT_BITS)
        counts = block_counts if counts is None else counts.add_(block_counts)
    return counts


def _digit_holding_kth(counts: Tensor, k: int, above: int) -> tuple[int, int]:
    """Largest digit d with above + #(digit >= d) >= k, and the new count of entries strictly above it."""
    at_least = counts.flip(0).cumsum(0).flip(0) + above
    digit = int((at_least >= k).nonzero().max())
    return digit, int(at_least[digit] - counts[digit])


def _gather(scores, names, threshold: int, ties: "int | dict[str, int]", base=None) -> dict[str, Tensor]:
    """Entries with key > threshold, and ties at it up to the quota: one running quota over all tensors
    (int), or one per tensor (dict: a rank's share of the ties in sharded selection)."""
    picked: dict[str, list[Tensor]] = {}
    per_name = isinstance(ties, dict)
    quotas = dict(ties) if per_name else None
    for name, lo, keys in _blocks(scores, names, base=base):
        quota = quotas[name] if per_name else ties
        chosen = (keys >= threshold).nonzero().squeeze(1)
        at_threshold = keys[chosen] == threshold
        tied = at_threshold.nonzero().squeeze(1)[quota:]  # ties beyond the quota are dropped
        quota = max(0, quota - int(at_threshold.sum()))
        if per_name:
            quotas[name] = quota
        else:
            ties = quota
        if tied.numel():
            keep = torch.ones_like(at_threshold)
            keep[tied] = False
            chosen = chosen[keep]
        if chosen.numel():
            picked.setdefault(name, []).append(chosen + lo)
    return {name: torch.cat(parts) for name, parts in picked.items()}
