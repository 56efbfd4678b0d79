"""K/V statistics accumulated on the model's device, over real (non-pad) tokens only.

All work is tensor ops on the capture device; the host reads one boolean per batch
(:meth:`KVStatistics.finish_batch`) and the results once at the end (:meth:`KVStatistics.layer_summary`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

PERCENTILES: dict[str, float] = {"p99": 0.99, "p99.9": 0.999, "p99.99": 0.9999}


@dataclass
class RealTokens:
    """Where a batch's real tokens sit: ``(batch[i], position[i])`` for ``i < count``.

    Built on the host from the attention mask before the forward, so no device sync is needed.
    ``batch``, ``position`` and ``flat`` (``batch * seq + position``) are int64 tensors of
    shape ``[count]`` on the capture device.
    """

    batch: torch.Tensor
    position: torch.Tensor
    flat: torch.Tensor
    count: int

    @classmethod
    def from_mask(cls, attention_mask: torch.Tensor, device: torch.device) -> RealTokens:
        """From a host ``[batch, seq]`` 0/1 mask (1 = real token)."""
        batch, position = attention_mask.nonzero(as_tuple=True)
        flat = batch * attention_mask.shape[1] + position
        return cls(*(t.to(device, non_blocking=True) for t in (batch, position, flat)), int(batch.numel()))

    def gather(self, states: list[torch.Tensor]) -> torch.Tensor:
        """Real-token rows of cache writes ``[batch, heads, seq, head_dim]`` (equal shapes), stacked:
        ``[count, len(states), heads, head_dim]``."""
        if states[0].device.type == "cpu":
            return self.gather_selected(states)
        return self.gather_indexed(states)

    def gather_selected(self, states: list[torch.Tensor]) -> torch.Tensor:
        """:meth:`gather` by ``index_select`` on a token-major copy of each tensor (fast on CPU)."""
        return torch.stack(
            [s.transpose(1, 2).flatten(0, 1).index_select(0, self.flat) for s in states], dim=1
        )

    def gather_indexed(self, states: list[torch.Tensor]) -> torch.Tensor:
        """:meth:`gather` as one stack and one advanced index, however many tensors (few GPU kernels)."""
        return torch.stack(states)[:, self.batch, :, self.position, :]


@dataclass
class LayerGroup:
    """Running statistics of the ``G`` layers sharing one K/V shape, on the capture device.

    Row ``i`` of the ``2G`` axis is K of ``layers[i]``, row ``G + i`` its V.
    ``minimum`` / ``maximum``: float32 ``[2G, heads, head_dim]`` (exact: every bf16/fp16/fp32
    value is a float32); ``k_sum``: float64 ``[G, heads, head_dim]``; ``sample``: float32
    ``[2G, capacity]`` samples of ``|K|`` / ``|V|``; ``count``: real tokens folded in.
    """

    layers: list[int]
    minimum: torch.Tensor
    maximum: torch.Tensor
    k_sum: torch.Tensor
    sample: torch.Tensor
    count: int = 0

    @classmethod
    def empty(
        cls, layers: list[int], heads: int, head_dim: int, capacity: int, device: torch.device
    ) -> LayerGroup:
        """Statistics of no tokens yet."""
        shape = (2 * len(layers), heads, head_dim)
        return cls(
            layers=layers,
            minimum=torch.full(shape, float("inf"), device=device),
            maximum=torch.full(shape, float("-inf"), device=device),
            k_sum=torch.zeros((len(layers), heads, head_dim), dtype=torch.float64, device=device),
            sample=torch.empty((2 * len(layers), capacity), device=device),
        )


@dataclass
class LayerSummary:
    """Host-side results of one layer (Python floats), ready for ``scales.json``.

    Per-channel arrays are ``[heads][head_dim]``; per-head lists ``[heads]``.
    """

    k_amax_raw: float
    v_amax: float
    k_amax_raw_per_head: list[float]
    v_amax_per_head: list[float]
    k_amax_centered: float
    k_amax_centered_per_head: list[float]
    k_offset: list[list[float]]
    k_percentiles: dict[str, float]
    v_percentiles: dict[str, float]
    k_top_channels: list[dict[str, float | int]]
    num_tokens: int


@dataclass
class KVStatistics:
    """Statistics of every attention layer, from the cache writes of each batch.

    ``eager`` folds each layer's write in as it arrives (CPU: the tensors are still in cache);
    otherwise writes are kept by reference and :meth:`finish_batch` folds all layers of one K/V
    shape in a single stacked pass (GPU: a fixed handful of kernels per batch, not per layer).

    Percentiles come from a per-layer sample of whole real tokens (every K or V element of each
    picked token): all tokens when the run has at most ``sample_size // (heads * head_dim)`` of
    them (:meth:`exact`), otherwise that many tokens drawn uniformly with replacement, each
    batch contributing in proportion to its real tokens.

    Parameters
    ----------
    total_tokens
        Real tokens the whole run will feed (known once the texts are tokenized).
    sample_size
        Upper bound of the elements kept per layer and tensor for percentiles.
    seed
        Seed of the sampling generator.
    eager
        Fold per layer at each write; ``None``: eager on CPU, batched on other devices.
    """

    total_tokens: int
    sample_size: int = 1 << 20
    seed: int = 0
    eager: bool | None = None
    groups: dict[tuple[int, ...], LayerGroup] = field(default_factory=dict)
    tokens: RealTokens | None = None
    _pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    _finite: list[torch.Tensor] = field(default_factory=list)
    _tokens_before: int = 0
    _generator: torch.Generator | None = None

    def start_batch(self, tokens: RealTokens) -> None:
        """Set the real tokens of the batch about to run."""
        if self.tokens is not None:
            self._tokens_before += self.tokens.count
        self.tokens = tokens
        self._pending, self._finite = {}, []

    def record(self, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Take one layer's cache write, K (after RoPE) and V ``[batch, kv_heads, seq, head_dim]``."""
        if self.tokens is None:
            raise RuntimeError("start_batch must be called before the forward")
        capture = self.tokens.flat.device  # a model placed across devices writes from each layer's own
        key_states, value_states = key_states.to(capture), value_states.to(capture)
        if self.eager is None:
            self.eager = key_states.device.type == "cpu"
        if self.eager:
            self._finite.append(self._fold([layer_idx], [key_states], [value_states]))
        else:
            self._pending[layer_idx] = (key_states, value_states)

    def finish_batch(self) -> bool:
        """Fold what the batch left pending; return whether every value was finite (one host sync)."""
        shapes: dict[tuple[int, ...], list[int]] = {}
        for layer_idx, (keys, _) in sorted(self._pending.items()):
            shapes.setdefault(tuple(keys.shape[1::2]), []).append(layer_idx)
        for layers in shapes.values():
            writes = [self._pending[i] for i in layers]
            self._finite.append(self._fold(layers, [k for k, _ in writes], [v for _, v in writes]))
        finite = not self._finite or bool(torch.stack(self._finite).all())
        self._pending, self._finite = {}, []
        return finite

    def sample_tokens(self, elements_per_token: int) -> int:
        """Tokens per layer in the percentile sample (for ``heads * head_dim`` elements per token)."""
        return max(1, self.sample_size // elements_per_token)

    def exact(self, elements_per_token: int) -> bool:
        """Whether the percentile sample holds every real token."""
        return self.total_tokens <= self.sample_tokens(elements_per_token)

    def _fold(self, layers: list[int], keys: list[torch.Tensor], values: list[torch.Tensor]) -> torch.Tensor:
        """Fold the writes of ``layers`` (one K/V shape) in; return a device bool: all finite."""
        key = tuple(layers)
        real = self.tokens.gather(keys + values)  # [tokens, 2G, heads, head_dim]
        group = self.groups.get(key)
        if group is None:
            _, _, heads, head_dim = real.shape
            per_token = heads * head_dim
            capacity = min(self.total_tokens, self.sample_tokens(per_token)) * per_token
            group = self.groups[key] = LayerGroup.empty(layers, heads, head_dim, capacity, real.device)
        batch_min, batch_max = real.amin(dim=0), real.amax(dim=0)  # amin/amax propagate NaN
        torch.minimum(group.minimum, batch_min.float(), out=group.minimum)
        torch.maximum(group.maximum, batch_max.float(), out=group.maximum)
        group.k_sum += real[:, : len(layers)].sum(dim=0, dtype=torch.float32)
        group.count += self.tokens.count
        self._sample(group, real)
        return torch.isfinite(torch.stack([batch_min, batch_max])).all()

    def _sample(self, group: LayerGroup, real: torch.Tensor) -> None:
        tokens, rows, heads, head_dim = real.shape
        per_token = heads * head_dim
        if self.exact(per_token):
            start, stop, picked = self._tokens_before, self._tokens_before + tokens, real
        else:
            budget = self.sample_tokens(per_token)
            start = budget * self._tokens_before // self.total_tokens
            stop = budget * (self._tokens_before + tokens) // self.total_tokens
            if stop == start:
                return
            if self._generator is None:
                self._generator = torch.Generator(device=real.device).manual_seed(self.seed)
            picks = torch.randint(0, tokens, (stop - start,), device=real.device, generator=self._generator)
            picked = real.index_select(0, picks)
        group.sample[:, start * per_token : stop * per_token] = picked.transpose(0, 1).reshape(rows, -1).abs()

    def layer_summary(self, layer_idx: int, top_channels: int) -> LayerSummary:
        """Host-side results of layer ``layer_idx`` (syncs)."""
        group = next(g for g in self.groups.values() if layer_idx in g.layers)
        row, num = group.layers.index(layer_idx), len(group.layers)
        k_min, k_max = group.minimum[row].double(), group.maximum[row].double()
        k_channel = torch.maximum(k_max, -k_min)  # raw |K| amax per [head, channel]
        v_channel = torch.maximum(group.maximum[num + row], -group.minimum[num + row]).double()
        mean = group.k_sum[row] / group.count
        centered = torch.maximum(k_max - mean, mean - k_min)  # exact amax of K - mean, per channel
        quantiles = torch.tensor(list(PERCENTILES.values()), dtype=torch.float64, device=mean.device)
        k_q = torch.quantile(group.sample[row].double(), quantiles).tolist()
        v_q = torch.quantile(group.sample[num + row].double(), quantiles).tolist()
        top = torch.topk(k_channel.flatten(), min(top_channels, k_channel.numel()))
        head_dim = k_channel.shape[1]
        return LayerSummary(
            k_amax_raw=k_channel.max().item(),
            v_amax=v_channel.max().item(),
            k_amax_raw_per_head=k_channel.amax(dim=1).tolist(),
            v_amax_per_head=v_channel.amax(dim=1).tolist(),
            k_amax_centered=centered.max().item(),
            k_amax_centered_per_head=centered.amax(dim=1).tolist(),
            k_offset=mean.tolist(),
            k_percentiles=dict(zip(PERCENTILES, k_q)),
            v_percentiles=dict(zip(PERCENTILES, v_q)),
            k_top_channels=[
                {"head": index // head_dim, "channel": index % head_dim, "amax": value}
                for value, index in zip(top.values.tolist(), top.indices.tolist())
            ],
            num_tokens=group.count,
        )

    @property
    def recorded_layers(self) -> set[int]:
        """Indices of every layer that wrote the cache so far."""
        return {index for group in self.groups.values() for index in group.layers}

    def layer_shape(self, layer_idx: int) -> tuple[int, int]:
        """``(kv_heads, head_dim)`` of layer ``layer_idx``."""
        group = next(g for g in self.groups.values() if layer_idx in g.layers)
        return tuple(group.k_sum.shape[1:])
