"""``build_model``: the job's [model] section + data shape → a seeded torch module.

Initialization is a pure function of ``seed`` (via ``derive_seed(seed,
"model-init")``) and leaves torch's global RNG untouched, so root and every
client can build the identical starting model without communicating it, and
building a model never perturbs anything else seeded in the process.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from hpcfl.config.schema import SCHEMA
from hpcfl.errors import ConfigError
from hpcfl.models.cnn import CNN2, cnn2_feature_hw, cnn2_min_side
from hpcfl.models.dense import MLP, LogReg
from hpcfl.models.resnet import ResNet
from hpcfl.seeding import derive_seed

__all__ = ["build_model", "MODEL_NAMES"]

MODEL_NAMES = ("logreg", "mlp", "cnn2", "resnet")
_IMAGE_MODELS = ("cnn2", "resnet")


def _get(cfg: Mapping[str, Any], key: str) -> Any:
    # The validated job always has every key; the fallback keeps ad-hoc callers short.
    return cfg[key] if key in cfg else SCHEMA["model"][key].default


def _shape_str(shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape) if len(shape) > 1 else f"({shape[0]},)"


def _image_shape(name: str, shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(shape) != 3:
        raise ConfigError(
            "model.name",
            f"{name!r} needs image samples of shape (C, H, W), but the data set's samples have shape "
            f"{_shape_str(shape)}; use 'logreg' or 'mlp'")
    return shape  # type: ignore[return-value]


def _check_cnn2_fits(shape: tuple[int, int, int], padding: str) -> None:
    _, h, w = shape
    if min(cnn2_feature_hw(h, w, padding)) >= 1:
        return
    need = cnn2_min_side(padding)
    msg = f"images of {_shape_str(shape)} are too small for cnn2 with padding {padding!r} (needs H, W >= {need})"
    works = [p for p in ("valid", "same") if min(cnn2_feature_hw(h, w, p)) >= 1]
    if works:
        msg += f"; use model.cnn_padding = {works[0]!r}"
    else:
        msg += "; no cnn_padding fits, use model.name = 'resnet' or 'mlp'"
    raise ConfigError("model.cnn_padding", msg)


def _construct(cfg: Mapping[str, Any], shape: tuple[int, ...], n_classes: int) -> nn.Module:
    name = _get(cfg, "name")
    if name == "logreg":
        return LogReg(shape, n_classes)
    if name == "mlp":
        hidden = [int(h) for h in _get(cfg, "hidden")]
        if any(h < 1 for h in hidden):
            raise ConfigError("model.hidden", f"hidden widths must be >= 1, got {hidden}")
        return MLP(shape, hidden, n_classes)
    if name == "cnn2":
        img = _image_shape(name, shape)
        padding = _get(cfg, "cnn_padding")
        if padding not in ("valid", "same"):
            raise ConfigError("model.cnn_padding", f"must be 'valid' or 'same', got {padding!r}")
        _check_cnn2_fits(img, padding)
        return CNN2(img, n_classes, padding)
    if name == "resnet":
        img = _image_shape(name, shape)
        width, stages = int(_get(cfg, "resnet_width")), int(_get(cfg, "resnet_stages"))
        if width < 1:
            raise ConfigError("model.resnet_width", f"must be >= 1, got {width}")
        if stages < 1:
            raise ConfigError("model.resnet_stages", f"must be >= 1, got {stages}")
        return ResNet(img[0], n_classes, width, stages)
    raise ConfigError("model.name", f"unknown model {name!r}; known: {', '.join(MODEL_NAMES)}")


def build_model(cfg: Mapping[str, Any], input_shape: tuple[int, ...], n_classes: int, seed: int) -> nn.Module:
    """Build the [model] ``cfg`` for samples of ``input_shape`` and ``n_classes`` logits.

    Deterministic in ``seed``; the global torch RNG state is restored afterwards.
    The result has no buffers: the FL loop exchanges parameters only, so any
    buffer would silently diverge between root and clients.
    """
    shape = tuple(int(d) for d in input_shape)
    if not shape or any(d < 1 for d in shape):
        raise ValueError(f"input_shape must be non-empty with positive sizes, got {input_shape!r}")
    if n_classes < 1:
        raise ValueError(f"n_classes must be >= 1, got {n_classes}")
    with torch.random.fork_rng(devices=[]):
        # default_generator only: torch.manual_seed would also reseed (unrestored) CUDA RNGs.
        torch.default_generator.manual_seed(derive_seed(seed, "model-init"))
        model = _construct(cfg, shape, n_classes)
    buffers = [n for n, _ in model.named_buffers()]
    if buffers:
        raise RuntimeError(f"model {_get(cfg, 'name')!r} has buffers {buffers}; only parameters are communicated")
    return model
