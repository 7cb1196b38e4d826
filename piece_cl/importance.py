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
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from piece_cl.errors import PieceError
from piece_cl.scope import exclude_patterns

# Regular expressions searched in parameter names. Embeddings are excluded as in the authors' code;
# lm_head stays eligible when untied (a tied lm_head shares the embedding's name and is excluded with it);
# vision towers of multimodal models are excluded.
DEFAULT_EXCLUDE: tuple[str, ...] = exclude_patterns()  # piece_cl/scope.py: embeddings, the vision side

# ξ of Eq. 10 in squared-gradient units: it only guards against 0/0 and damps entries whose RMS
# gradient is far below 1e-4, so S ranks by consistency of sign rather than by noise-level gradients.
DEFAULT_XI = 1e-8

KINDS = ("fisher", "s")
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


@dataclass
class _Moments:
    """Running Σ g and Σ g² of one parameter, in at least fp32."""

    sq: Tensor
    total: Tensor | None

    def add(self, per_group: Tensor) -> None:
        """Fold gradients of shape (groups, *param.shape) in; squares in place to save a buffer."""
        if self.total is not None:
            self.total += per_group.sum(0)
        self.sq += per_group.mul_(per_group).sum(0)


class _PerSampleHooks:
    """Forward/backward hooks that turn one chunk's backward into per-sample gradient moments."""

    def __init__(self, model: nn.Module, eligible: list[tuple[str, nn.Parameter]], need_sum: bool, per_sample: bool):
        self.per_sample = per_sample
        self.moments: dict[str, _Moments] = {}
        for name, param in eligible:
            acc = torch.promote_types(param.dtype, torch.float32)
            zeros = lambda: torch.zeros(param.shape, dtype=acc, device=param.device)  # noqa: E731
            self.moments[name] = _Moments(zeros(), zeros() if need_sum else None)
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
            acc = moments.sq.dtype
            if not self.per_sample:  # one group: the whole chunk (the authors' mini-batch gradient)
                dd = d.reshape(-1, d.shape[-1]).to(acc)
                g = dd.T @ x.reshape(-1, x.shape[-1]).to(acc) if attr == "weight" else dd.sum(0)
                moments.add(g.unsqueeze(0))
                continue
            if attr == "bias":
                moments.add(d.to(acc).sum(1))
                continue
            step = max(1, _PER_SAMPLE_BUFFER_BYTES // (module.weight.numel() * moments.sq.element_size()))
            for lo in range(0, rows, step):
                moments.add(torch.bmm(d[lo : lo + step].to(acc).transpose(1, 2), x[lo : lo + step].to(acc)))

    def _generic(self, module: nn.Module, args: tuple, kwargs: dict, d: Tensor) -> None:
        """Per-sample gradients of a module's own parameters by vmap over the batch of <d_n, f(x_n)>.

        Assumes the first positional input carries the batch; other inputs are passed unbatched.
        """
        owned = self.owned[module]
        acc = self.moments[owned[0][1]].sq.dtype
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


def _chunks(batches: Iterable[Mapping[str, Tensor]], size: int | None, device: torch.device) -> Iterator[dict]:
    """Rows of each batch in chunks of `size` (None: the batch as is), trimmed after the last answer token."""
    for batch in batches:
        extra = set(batch) - _BATCH_KEYS
        if extra or "input_ids" not in batch or "labels" not in batch:
            raise PieceError(f"importance batches hold input_ids, labels and optionally attention_mask; got {sorted(batch)}")
        rows = batch["input_ids"].shape[0]
        for lo in range(0, rows, size or rows):
            chunk = {k: v[lo : lo + (size or rows)].to(device) for k, v in batch.items()}
            answer = (chunk["labels"] != -100).any(0).nonzero()
            # Under causal attention positions after the last label cannot change the loss: drop them.
            length = int(answer.max()) + 1 if answer.numel() else 0
            yield {k: v[:, :length] for k, v in chunk.items()}


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
) -> dict[str, Tensor]:
    """Importance of every eligible parameter on the model as it stands: fp32, same shapes, eligible order.

    kind "fisher": F = mean_n g_n²  (Eq. 4).  kind "s": S = |mean_n g_n| / sqrt(mean_n g_n² + ξ)  (Eq. 10);
    with ``xi_on_sums`` S = |Σ g_n| / sqrt(Σ g_n² + ξ) (the authors' code, with ξ = 1).
    g_n is the gradient of the answer log-likelihood of sample n (``granularity="sample"``, the paper)
    or of batch n as given by `batches` (``"batch"``, the authors' code). ``reduction="sum"`` is log p(y|x),
    the sum over answer tokens; ``"mean"`` averages over answer tokens (per sample, or per batch for
    "batch" granularity: the authors' token-mean cross-entropy). Batches are right padded with labels -100
    on prompt and padding. Runs in eval mode without touching ``.grad`` or the weights.
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
    eligible = eligible_parameters(model) if eligible is None else list(eligible)
    if not eligible:
        raise PieceError("no eligible parameters for importance (check the exclude/include patterns)")
    per_sample = granularity == "sample"
    device = eligible[0][1].device
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    hooks = _PerSampleHooks(model, eligible, need_sum=kind == "s", per_sample=per_sample)
    groups = 0
    try:
        model.eval()
        for p in flags:
            p.requires_grad_(False)
        with torch.enable_grad():
            for chunk in _chunks(batches, chunk_size if per_sample else None, device):
                groups += chunk["input_ids"].shape[0] if per_sample else 1
                if chunk["labels"].shape[1] == 0:
                    continue  # no answer token anywhere: zero gradients, still counted
                hooks.start_chunk()
                _answer_loss(model, chunk, reduction, per_sample).backward()
                hooks.finish_chunk()
    finally:
        hooks.close()
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
    if groups == 0:
        raise PieceError("importance needs at least one sample; the batches were empty")
    return {name: _score(hooks.moments[name], kind, xi, groups, xi_on_sums) for name, _ in eligible}


def _score(moments: _Moments, kind: str, xi: float, groups: int, xi_on_sums: bool) -> Tensor:
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


def select_top_k(scores: Mapping[str, Tensor], ratio: float, total: int | None = None) -> dict[str, Tensor]:
    """The k = floor(ratio × total) largest scores over all tensors: name -> sorted int64 flat indices.

    Scores must be non-negative fp32 without NaN. Ties at the threshold go to the smallest
    (tensor name, flat index) in sorted name order, so the result does not depend on dict order.
    Tensors with no selected entry are omitted. k is computed from the decimal ratio exactly.
    """
    names = sorted(scores)
    entries = sum(scores[n].numel() for n in names)
    k = top_k_size(ratio, entries if total is None else total, entries)
    for name in names:
        if scores[name].dtype != torch.float32:
            raise PieceError(f"top-k scores must be float32; {name} is {scores[name].dtype}")
    high_hist = _histogram(scores, names, lambda keys: keys >> _DIGIT_BITS, validate=True)
    high, above = _digit_holding_kth(high_hist, k, 0)
    low_mask = (1 << _DIGIT_BITS) - 1
    low_hist = _histogram(scores, names, lambda keys: keys[(keys >> _DIGIT_BITS) == high] & low_mask)
    low, above = _digit_holding_kth(low_hist, k, above)
    return _gather(scores, names, (high << _DIGIT_BITS) | low, ties=k - above)


def _blocks(scores: Mapping[str, Tensor], names: list[str], validate: bool = False) -> Iterator[tuple[str, int, Tensor]]:
    """(name, offset, int32 keys) per block; for non-negative floats the bit pattern orders like the value."""
    for name in names:
        flat = scores[name].detach().reshape(-1)
        for lo in range(0, flat.numel(), _BLOCK):
            block = flat[lo : lo + _BLOCK]
            if validate and not bool((block >= 0).all()):  # False for NaN and negatives, True for -0.0
                raise PieceError(f"top-k scores must be non-negative and not NaN; {name} is not")
            yield name, lo, block.view(torch.int32).clamp_min(0)  # -0.0 has the sign bit: count it as 0.0


def _histogram(scores, names, digit, validate: bool = False) -> Tensor:
    counts = None
    for _, _, keys in _blocks(scores, names, validate):
        block_counts = torch.bincount(digit(keys), minlength=1 << _DIGIT_BITS)
        counts = block_counts if counts is None else counts.add_(block_counts)
    return counts


def _digit_holding_kth(counts: Tensor, k: int, above: int) -> tuple[int, int]:
    """Largest digit d with above + #(digit >= d) >= k, and the new count of entries strictly above it."""
    at_least = counts.flip(0).cumsum(0).flip(0) + above
    digit = int((at_least >= k).nonzero().max())
    return digit, int(at_least[digit] - counts[digit])


def _gather(scores, names, threshold: int, ties: int) -> dict[str, Tensor]:
    picked: dict[str, list[Tensor]] = {}
    for name, lo, keys in _blocks(scores, names):
        chosen = (keys >= threshold).nonzero().squeeze(1)
        at_threshold = keys[chosen] == threshold
        tied = at_threshold.nonzero().squeeze(1)[ties:]  # ties beyond the quota are dropped
        ties = max(0, ties - int(at_threshold.sum()))
        if tied.numel():
            keep = torch.ones_like(at_threshold)
            keep[tied] = False
            chosen = chosen[keep]
        if chosen.numel():
            picked.setdefault(name, []).append(chosen + lo)
    return {name: torch.cat(parts) for name, parts in picked.items()}
