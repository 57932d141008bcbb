"""Sentence embeddings from token states, as sentence-transformers folders describe them.

A sentence-transformers folder lists its pipeline in ``modules.json`` (Transformer -> Pooling ->
optionally Normalize); ``<pooling path>/config.json`` says which poolings to apply. For sequence b
with token states h_1..h_L (no padding: the flattened batch holds exactly L tokens):
    cls:            h_1
    mean:           (1/L) sum_i h_i
    max:            max_i h_i                   (per feature)
    mean_sqrt_len:  (1/sqrt(L)) sum_i h_i
    weightedmean:   sum_i i h_i / sum_i i       (later tokens weigh more)
    lasttoken:      h_L
Several modes enabled at once are concatenated in that order, as sentence-transformers does.
Normalize (if the folder has that module) divides by the L2 norm. ``include_prompt`` is ignored.

A folder without ``modules.json`` (a plain BertModel checkpoint) gets mean pooling and no
normalization, the usual choice for BERT sentence embeddings.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

MODES = ("cls", "max", "mean", "mean_sqrt_len", "weightedmean", "lasttoken")
_POOLING = "sentence_transformers.models.Pooling"
_NORMALIZE = "sentence_transformers.models.Normalize"
_TRANSFORMER = "sentence_transformers.models.Transformer"
# config.json keys of sentence-transformers' Pooling module, in its concatenation order.
_CONFIG_KEYS = {
    "pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
    "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken",
}


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None


class Pooler:
    """hidden[T, H] of a flattened batch + cu_seqlens[B+1] -> embeddings[B, d] (float32)."""

    def __init__(self, modes: tuple[str, ...] | str = "mean", normalize: bool = False):
        modes = (modes,) if isinstance(modes, str) else tuple(modes)
        bad = [m for m in modes if m not in MODES]
        if not modes or bad:
            raise ValueError(f"pooling modes must be a non-empty subset of {MODES}, got {modes}")
        self.modes = tuple(m for m in MODES if m in modes)
        self.normalize = normalize

    def __repr__(self) -> str:
        return f"Pooler(modes={self.modes}, normalize={self.normalize})"

    @classmethod
    def from_folder(cls, path: str | Path) -> "Pooler | None":
        """The folder's pooling; mean without normalization when there is no ``modules.json``;
        None when ``modules.json`` lists no Pooling module (the pipeline pools nothing)."""
        path = Path(path)
        modules_file = path / "modules.json"
        if not modules_file.is_file():
            return cls("mean", normalize=False)
        modules = _read_json(modules_file)
        types = [m.get("type") for m in modules]
        unknown = [t for t in types if t not in (_TRANSFORMER, _POOLING, _NORMALIZE)]
        if unknown:
            raise ValueError(f"{modules_file}: unsupported sentence-transformers modules {unknown}; "
                             f"lepton runs {_TRANSFORMER}, {_POOLING} and {_NORMALIZE}")
        pooling = [m for m in modules if m.get("type") == _POOLING]
        if not pooling:
            return None
        config_file = path / pooling[0].get("path", "") / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"pooling config {config_file} (named in {modules_file}) does not exist")
        config = _read_json(config_file)
        modes = tuple(mode for key, mode in _CONFIG_KEYS.items() if config.get(key))
        if not modes and config.get("pooling_mode") in MODES:
            modes = (config["pooling_mode"],)
        if not modes:
            raise ValueError(f"{config_file} enables no pooling mode lepton knows ({', '.join(_CONFIG_KEYS)})")
        return cls(modes, normalize=_NORMALIZE in types)

    def __call__(self, hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """hidden[T, H], cu_seqlens[B+1] (int) -> [B, len(modes) * H], float32."""
        if hidden.dim() != 2:
            raise ValueError(f"hidden must be [T, H], got shape {tuple(hidden.shape)}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(f"cu_seqlens must be [B+1] with B >= 1, got shape {tuple(cu_seqlens.shape)}")
        cu = cu_seqlens.to(device=hidden.device, dtype=torch.long)
        starts, ends = cu[:-1], cu[1:]
        lens = ends - starts                                          # [B]
        B, T = lens.numel(), hidden.shape[0]
        h = hidden.float()
        # seq[t]: the sequence token t belongs to; output_size avoids a device sync.
        seq = torch.repeat_interleave(torch.arange(B, device=h.device), lens, output_size=T)
        sums = None
        parts = []
        for mode in self.modes:
            if mode == "cls":
                parts.append(h[starts])
            elif mode == "lasttoken":
                parts.append(h[ends - 1])
            elif mode == "max":
                index = seq[:, None].expand_as(h)
                parts.append(h.new_full((B, h.shape[1]), float("-inf")).scatter_reduce_(0, index, h, "amax"))
            elif mode == "weightedmean":
                weight = (torch.arange(T, device=h.device) - starts[seq] + 1).float()   # 1..L per sequence
                num = h.new_zeros(B, h.shape[1]).index_add_(0, seq, h * weight[:, None])
                parts.append(num / (lens * (lens + 1) / 2).float()[:, None])
            else:
                if sums is None:
                    sums = h.new_zeros(B, h.shape[1]).index_add_(0, seq, h)
                denom = lens.float() if mode == "mean" else lens.float().sqrt()
                parts.append(sums / denom[:, None])
        out = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        return F.normalize(out, p=2.0, dim=1) if self.normalize else out
