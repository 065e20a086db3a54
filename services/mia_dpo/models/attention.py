"""Read decoder layers' attention weights (one, or a chosen few) in a teacher-forced pass.

Asking a Hugging Face model for ``output_attentions=True`` needs the eager kernel
in every layer and returns a (B, H, T, T) tensor per layer: memory grows with the
number of layers and the square of the sequence. MIA-DPO (docs/method.md §3)
needs one layer, averaged over heads, for the response rows only. So:

* a custom attention function, registered as ``"mia_capture"`` in transformers'
  ``AttentionInterface``, returns exactly what sdpa returns (it calls it), and in
  the one marked layer also computes softmax(q_rows k^T * scaling + mask) for the
  requested query rows in float32 -> (B, H, R, T) -> mean over heads (B, R, T);
* the mask function registered under the same name is sdpa's, so the model
  builds its masks exactly as for sdpa;
* ``AttentionProbe`` switches only the text model to ``"mia_capture"`` (through
  ``set_attn_implementation`` with the text sub-config key) for the duration of
  the ``with`` block and restores the previous implementation afterwards.

While probing, every layer runs sdpa (which on GPU dispatches to its flash or
memory-efficient kernels); the vision tower keeps its own implementation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

CAPTURE_IMPLEMENTATION = "mia_capture"
_PROBE_ATTR = "_mia_probe"


def capture_attention_forward(
    module: nn.Module,
    query: torch.Tensor,  # (B, H, Q, D)
    key: torch.Tensor,  # (B, H_kv, T, D)
    value: torch.Tensor,  # (B, H_kv, T, D)
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """sdpa's attention; in the probed layer it also hands the head-mean weights of the
    requested rows to the probe. The layer's output is sdpa's, untouched."""
    out = sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
    )
    probe = getattr(module, _PROBE_ATTR, None)
    if probe is not None:
        weights = _row_weights(module, query, key, attention_mask, scaling, probe.rows, kwargs)
        probe._record(module, weights)
    return out


def _row_weights(
    module: nn.Module,
    query: torch.Tensor,  # (B, H, Q, D)
    key: torch.Tensor,  # (B, H_kv, T, D)
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    rows: tuple[int, int],
    kwargs: Mapping[str, Any],
) -> torch.Tensor:
    """Head-mean softmax weights for query rows [r0, r1): (B, R, T) float32."""
    r0, r1 = rows
    q_len, kv_len = query.shape[2], key.shape[2]
    if not 0 <= r0 < r1 <= q_len:
        raise ValueError(f"probe rows {rows} outside the {q_len} query positions of this pass")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    # float32 whatever the model dtype: ratios of small attention values need the precision;
    # no graph either, the weights are only read
    with torch.no_grad():
        q = query[:, :, r0:r1].float()  # (B, H, R, D)
        k = repeat_kv(key, getattr(module, "num_key_value_groups", 1)).float()  # (B, H, T, D)
        scores = (q @ k.transpose(-1, -2)) * scaling  # (B, H, R, T)
        allowed: torch.Tensor | None = None  # bool, broadcastable to (B, H, R, T)
        if attention_mask is None:
            # sdpa then relies on is_causal (upper-left aligned, only when Q > 1): same rule
            is_causal = kwargs.get("is_causal")
            if is_causal is None:
                is_causal = getattr(module, "is_causal", True)
            if is_causal and q_len > 1:
                q_idx = torch.arange(r0, r1, device=scores.device)[:, None]  # (R, 1)
                k_idx = torch.arange(kv_len, device=scores.device)[None, :]  # (1, T)
                allowed = k_idx <= q_idx  # (R, T)
        elif attention_mask.dtype == torch.bool:
            allowed = attention_mask[..., r0:r1, :]  # (B, 1, R, T), True = attend
        else:
            scores = scores + attention_mask[..., r0:r1, :].float()  # additive (B, 1, R, T)
        position_bias = kwargs.get("position_bias")
        if position_bias is not None:
            scores = scores + position_bias[..., r0:r1, :].float()
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        # a row with every key masked (a left-padding row) gives NaN: report no attention
        weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # (B, H, R, T)
        return weights.mean(dim=1)  # (B, R, T)


def register_capture_attention() -> None:
    """Register ``"mia_capture"`` (idempotent): sdpa's function plus the probe, sdpa's masks."""
    AttentionInterface.register(CAPTURE_IMPLEMENTATION, capture_attention_forward)
    AttentionMaskInterface.register(CAPTURE_IMPLEMENTATION, sdpa_mask)


def _text_model(model: nn.Module) -> nn.Module:
    """The language model (the module holding the decoder ``layers``) of a HF model."""
    candidates: list[Any] = []
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        # some wrappers raise for exotic layouts: fall through to the other lookups
        with contextlib.suppress(AttributeError, NotImplementedError, ValueError):
            candidates.append(get_decoder())
    for path in ("model.language_model", "language_model", "model.model", "model"):
        obj: Any = model
        for name in path.split("."):
            obj = getattr(obj, name, None)
            if obj is None:
                break
        candidates.append(obj)
    for cand in candidates:
        if isinstance(cand, nn.Module) and _is_decoder_list(getattr(cand, "layers", None)):
            return cand
    # last resort (e.g. a wrapper we do not know): the first module with decoder layers
    for sub in model.modules():
        if _is_decoder_list(getattr(sub, "layers", None)):
            return sub
    raise ValueError(f"no decoder layers found in {type(model).__name__}")


def _is_decoder_list(layers: Any) -> bool:
    return (
        isinstance(layers, nn.ModuleList)
        and len(layers) > 0
        and all(hasattr(layer, "self_attn") for layer in layers)
    )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The language model's decoder layers (LLaVA: ``model.model.language_model.layers``)."""
    return _text_model(model).layers  # type: ignore[return-value]


def _config_path(config: Any, target: Any) -> list[str] | None:
    """Sub-config keys leading from ``config`` to ``target`` (identity); [] when equal."""
    if config is target:
        return []
    for key in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, key, None)
        if sub is not None and (path := _config_path(sub, target)) is not None:
            return [key, *path]
    return None


def _nested(path: list[str], value: str) -> str | dict[str, Any]:
    """["text_config"], "x" -> {"text_config": "x"}: the form set_attn_implementation takes."""
    out: str | dict[str, Any] = value
    for key in reversed(path):
        out = {key: out}
    return out


class AttentionProbe:
    """Capture decoder layers' head-mean attention for query rows [r0, r1).

    >>> with AttentionProbe(model, layer=16, rows=(r0, r1)) as probe:
    ...     model(**inputs)
    >>> probe.weights  # (B, r1 - r0, T) float32, T = the full (padded) sequence

    `layer` may be a list (calibration reads every layer in one pass): then
    `probe.layer_weights[i]` is the i-th listed layer's (B, R, T), and `weights` the
    first's. Rows index the positions of the padded batch; rows of padding come out as
    zeros and are the caller's to ignore.
    """

    def __init__(self, model: nn.Module, layer: int | Sequence[int], rows: tuple[int, int]) -> None:
        self.model = model
        self.text_model = _text_model(model)
        layers = self.text_model.layers
        wanted = [layer] if isinstance(layer, int) else list(layer)
        if not wanted:
            raise ValueError("no layer to probe")
        for i in wanted:
            if not 0 <= i < len(layers):
                raise ValueError(f"layer {i} out of range: the model has {len(layers)} layers")
        r0, r1 = rows
        if not 0 <= r0 < r1:
            raise ValueError(f"rows must satisfy 0 <= r0 < r1, got {rows}")
        self.layer = wanted[0]
        self.layers = wanted
        self.rows = (int(r0), int(r1))
        self.calls = 0  # forward passes of a probed layer seen (tests, sanity)
        self._attns: list[nn.Module] = [layers[i].self_attn for i in wanted]
        self._weights: dict[int, torch.Tensor] = {}  # id(attention module) -> (B, R, T)
        self._previous: str | None = None
        self._path: list[str] = []

    def _record(self, module: nn.Module, weights: torch.Tensor) -> None:
        self.calls += 1
        self._weights[id(module)] = weights

    @property
    def layer_weights(self) -> list[torch.Tensor]:
        """Per probed layer, in the order given: (B, R, T) float32 of the last pass."""
        missing = [
            i for i, a in zip(self.layers, self._attns, strict=True) if id(a) not in self._weights
        ]
        if missing:
            raise RuntimeError(f"no forward pass of layer {missing[0]} ran inside the probe")
        return [self._weights[id(a)] for a in self._attns]

    @property
    def weights(self) -> torch.Tensor:
        """(B, R, T) float32 head-mean attention of the (first) probed layer."""
        return self.layer_weights[0]

    def __enter__(self) -> AttentionProbe:
        register_capture_attention()
        text_config = self.text_model.config
        path = _config_path(self.model.config, text_config)
        if path is None:
            raise ValueError("the text model's config is not a sub-config of the model's config")
        self._path = path
        self._previous = text_config._attn_implementation
        # only the text sub-model switches (e.g. {"text_config": "mia_capture"}); the vision
        # tower and the top-level config keep theirs
        self.model.set_attn_implementation(_nested(path, CAPTURE_IMPLEMENTATION))
        if text_config._attn_implementation != CAPTURE_IMPLEMENTATION:
            raise RuntimeError(f"could not switch {type(self.text_model).__name__} to capture")
        for attn in self._attns:
            setattr(attn, _PROBE_ATTR, self)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for attn in self._attns:
            if hasattr(attn, _PROBE_ATTR):
                delattr(attn, _PROBE_ATTR)
        if self._previous is not None:
            self.model.set_attn_implementation(_nested(self._path, self._previous))
            self._previous = None


def capture_layer_attention(
    model: nn.Module, inputs: Mapping[str, Any], layer: int, rows: tuple[int, int]
) -> torch.Tensor:
    """Run ``model(**inputs)`` without gradients and return layer ``layer``'s head-mean
    attention for query rows [r0, r1): (B, R, T) float32."""
    kwargs = dict(inputs)
    # a KV cache would keep every layer's keys and values: not needed for one pass
    kwargs.setdefault("use_cache", False)
    with torch.no_grad(), AttentionProbe(model, layer, rows) as probe:
        model(**kwargs)
    return probe.weights


def capture_layers_attention(
    model: nn.Module, inputs: Mapping[str, Any], layers: Sequence[int], rows: tuple[int, int]
) -> list[torch.Tensor]:
    """As `capture_layer_attention`, for several layers in one pass: per layer (B, R, T)."""
    kwargs = dict(inputs)
    kwargs.setdefault("use_cache", False)
    with torch.no_grad(), AttentionProbe(model, layers, rows) as probe:
        model(**kwargs)
    return probe.layer_weights
