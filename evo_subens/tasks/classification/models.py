"""Architectures of the parent network and loading of a trained parent's weights.

The registry maps a name to a builder ``builder(input_shape, num_classes, **kwargs)``; ``input_shape``
is per sample: ``(C, L)`` for 1-D signals (MNIST-1D), ``(C, H, W)`` for images (digits, Fashion-MNIST).
Every registry model ends in an ``nn.Linear`` named ``classifier``, registered last, so
:func:`classifier_parameter_names` finds it.

    >>> model = build_model(ModelConfig(name="cnn2d"), (1, 28, 28), 10)
    >>> classifier_parameter_names(model)
    ['classifier.weight', 'classifier.bias']
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ...core.config import ModelConfig
from ...errors import ConfigError
from ...imports import import_object
from ...nn import load_parent_state  # re-exported: parents were loaded from here before nn.py held it
from ...nn import output_parameter_names as classifier_parameter_names  # a classifier's output layer

__all__ = [
    "MODELS",
    "MLP",
    "CNN1d",
    "CNN2d",
    "LeNet",
    "build_model",
    "load_parent_state",
    "classifier_parameter_names",
]

# Width multipliers of the named LeNet sizes.
LENET_SIZES: dict[str, float] = {"S": 1.0, "M": 2.0, "L": 4.0}


def _positive_ints(name: str, value: Any) -> tuple[int, ...]:
    """``value`` as a tuple of positive ints (YAML gives lists), else a ConfigError on model.kwargs."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    ok = (isinstance(value, Sequence) and not isinstance(value, str)
          and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value))
    if not ok:
        raise ConfigError("model.kwargs", f"'{name}' as a list of positive integers", value)
    return tuple(value)


def _positive_int(name: str, value: Any) -> int:
    if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        raise ConfigError("model.kwargs", f"'{name}' as a positive integer", value)
    return value


def _probability(name: str, value: Any) -> float:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1):
        raise ConfigError("model.kwargs", f"'{name}' as a probability in [0, 1)", value)
    return float(value)


def _dropout(p: float) -> list[nn.Module]:
    """A dropout layer before the classifier when ``p`` > 0; none otherwise, so models without dropout keep
    their layer list (and the stages activation caching sees)."""
    return [nn.Dropout(p)] if p > 0 else []


def _check_rank(arch: str, input_shape: Sequence[int], rank: int, kind: str) -> tuple[int, ...]:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != rank or any(s < 1 for s in shape):
        raise ConfigError("model.name", f"an architecture for the data's per-sample shape {shape} "
                                        f"('{arch}' takes {kind})", arch)
    return shape


@torch.no_grad()
def _flat_size(features: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Features per sample after ``features``, found by a dummy forward so any input size works."""
    was_training = features.training
    features.eval()
    out = features(torch.zeros(1, *input_shape))
    features.train(was_training)
    return out[0].numel()


class MLP(nn.Module):
    """Flatten, then Linear/ReLU(/Dropout) hidden layers, then a Linear classifier."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (256, 256),
                 dropout: float = 0.0):
        super().__init__()
        hidden = _positive_ints("hidden", hidden)
        if not (isinstance(dropout, (int, float)) and not isinstance(dropout, bool) and 0 <= dropout < 1):
            raise ConfigError("model.kwargs", "'dropout' as a probability in [0, 1)", dropout)
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(int(s) for s in input_shape)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def stages(self) -> list[nn.Module]:
        """The modules ``forward`` applies, in order (see :func:`model_stages`)."""
        return [*self.features, self.classifier]


class _ConvClassifier(nn.Module):
    """features -> head -> classifier; subclasses build the three parts."""

    features: nn.Module
    head: nn.Module
    classifier: nn.Linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.head(self.features(x)))

    def stages(self) -> list[nn.Module]:
        """The modules ``forward`` applies, in order (see :func:`model_stages`)."""
        return [*self.features, *self.head, self.classifier]


class CNN1d(_ConvClassifier):
    """Conv1d/ReLU/MaxPool blocks on (C, L) signals, then Linear(hidden)/ReLU (/Dropout) and a Linear
    classifier."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, channels: Sequence[int] = (32, 64),
                 kernel_size: int = 5, hidden: int = 128, dropout: float = 0.0):
        super().__init__()
        shape = _check_rank("cnn1d", input_shape, 2, "1-D signal inputs (C, L)")
        dropout = _probability("dropout", dropout)
        channels = _positive_ints("channels", channels)
        kernel_size = _positive_int("kernel_size", kernel_size)
        hidden = _positive_int("hidden", hidden)
        layers: list[nn.Module] = []
        c, length = shape
        for out in channels:
            # 'same' padding keeps the length, so only the pooling shrinks it.
            layers += [nn.Conv1d(c, out, kernel_size, padding="same"), nn.ReLU()]
            if length >= 2:
                layers.append(nn.MaxPool1d(2))
                length //= 2
            c = out
        self.features = nn.Sequential(*layers)
        flat = _flat_size(self.features, shape)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(flat, hidden), nn.ReLU(), *_dropout(dropout))
        self.classifier = nn.Linear(hidden, num_classes)


class CNN2d(_ConvClassifier):
    """Small image CNN: Conv3x3/ReLU/MaxPool blocks, adaptive average pooling to at most
    ``pooled`` x ``pooled``, then Linear(hidden)/ReLU and a Linear classifier (~94k parameters
    with the defaults on 28x28)."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, channels: Sequence[int] = (32, 64),
                 hidden: int = 128, pooled: int = 3):
        super().__init__()
        shape = _check_rank("cnn2d", input_shape, 3, "2-D image inputs (C, H, W)")
        channels = _positive_ints("channels", channels)
        hidden = _positive_int("hidden", hidden)
        pooled = _positive_int("pooled", pooled)
        layers: list[nn.Module] = []
        c, h, w = shape
        for out in channels:
            layers += [nn.Conv2d(c, out, 3, padding=1), nn.ReLU()]
            if min(h, w) >= 2:  # small inputs (8x8 digits) run out of room to pool
                layers.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            c = out
        # Capping at the current size avoids upsampling small maps; fixing it makes the head's
        # size independent of the image size on large inputs.
        layers.append(nn.AdaptiveAvgPool2d((min(pooled, h), min(pooled, w))))
        self.features = nn.Sequential(*layers)
        flat = _flat_size(self.features, shape)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(flat, hidden), nn.ReLU())
        self.classifier = nn.Linear(hidden, num_classes)


class LeNet(_ConvClassifier):
    """LeNet-5 style: conv5x5(6)/pool, conv5x5(16)/pool, fc 120, fc 84, Linear classifier.

    Channels and units are scaled by ``width`` or by a named ``size`` (S=1x, M=2x, L=4x); the
    convolutions are padded by 2 so 8x8 inputs keep enough room; ``dropout`` acts before each hidden
    fully connected layer's successor (off at evaluation).
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, width: float = 1.0,
                 size: str | None = None, dropout: float = 0.0):
        super().__init__()
        shape = _check_rank("lenet", input_shape, 3, "2-D image inputs (C, H, W)")
        if not (isinstance(dropout, (int, float)) and 0 <= dropout < 1):
            raise ConfigError("model.kwargs", "'dropout' in [0, 1)", dropout)
        if size is not None:
            if size not in LENET_SIZES:
                raise ConfigError("model.kwargs", f"'size' as one of {', '.join(LENET_SIZES)}", size)
            if width != 1.0:
                raise ConfigError("model.kwargs", "either 'width' or 'size', not both",
                                  {"width": width, "size": size})
            width = LENET_SIZES[size]
        if not (isinstance(width, (int, float)) and not isinstance(width, bool) and width > 0):
            raise ConfigError("model.kwargs", "'width' as a positive number", width)

        def scaled(n: int) -> int:
            return max(1, round(n * width))

        c, h, w = shape
        layers: list[nn.Module] = []
        for out in (scaled(6), scaled(16)):
            layers += [nn.Conv2d(c, out, 5, padding=2), nn.ReLU()]
            if min(h, w) >= 2:
                layers.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            c = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(_flat_size(self.features, shape), scaled(120)),
                                  nn.ReLU(), nn.Dropout(dropout), nn.Linear(scaled(120), scaled(84)), nn.ReLU(),
                                  nn.Dropout(dropout))
        self.classifier = nn.Linear(scaled(84), num_classes)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "cnn1d": CNN1d,
    "cnn2d": CNN2d,
    "lenet": LeNet,
}


def _check_kwargs(builder: Callable[..., Any], kwargs: Mapping[str, Any], what: str,
                  *, positional: tuple = (), given: Mapping[str, Any] = {}) -> None:
    """Reject kwargs the constructor does not accept, naming the ones it does (``given``: keyword arguments
    the engine passes besides the user's)."""
    try:
        sig = inspect.signature(builder)
    except (TypeError, ValueError):  # some builtins have no signature; the call itself will tell
        return
    try:
        sig.bind(*positional, **given, **kwargs)
    except TypeError as exc:
        accepted = [p.name for p in list(sig.parameters.values())[len(positional):]
                    if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in given]
        raise ConfigError("model.kwargs", f"keyword arguments accepted by {what} "
                                          f"({', '.join(accepted) or 'none'}): {exc}", dict(kwargs)) from None


def _import_architecture(spec: str) -> Callable[..., Any]:
    obj = import_object(spec, "model.architecture", "Class")
    if inspect.isclass(obj) and not issubclass(obj, nn.Module):
        raise ConfigError("model.architecture", f"an importable 'module:Class' ('{spec.partition(':')[2]}' is "
                                                f"not a torch.nn.Module subclass)", spec)
    return obj


def _shape_arguments(builder: Callable[..., Any], input_shape: tuple[int, ...], num_classes: int) -> dict:
    """``input_shape`` / ``num_classes`` for a user architecture whose signature names them."""
    try:
        params = inspect.signature(builder).parameters
    except (TypeError, ValueError):
        return {}
    given = {"input_shape": tuple(input_shape), "num_classes": num_classes}
    return {name: value for name, value in given.items() if name in params}


def build_model(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Build the parent architecture: ``cfg.architecture`` (``module:Class``, built as
    ``Class(input_shape=..., num_classes=..., **cfg.kwargs)``, each of the two only if the signature names
    it) when set, else the registry entry ``cfg.name`` for this input shape."""
    kwargs = dict(cfg.kwargs or {})
    args: tuple = ()
    shape: dict = {}
    if cfg.architecture:
        builder = _import_architecture(cfg.architecture)
        what = cfg.architecture
        clash = [name for name in ("input_shape", "num_classes") if name in kwargs]
        if clash:
            raise ConfigError(f"model.kwargs.{clash[0]}", "left out: the engine passes it from the data",
                              kwargs[clash[0]])
        shape = _shape_arguments(builder, input_shape, num_classes)
    else:
        if cfg.name not in MODELS:
            raise ConfigError("model.name", "one of " + ", ".join(sorted(MODELS)), cfg.name)
        builder = MODELS[cfg.name]
        what = f"'{cfg.name}'"
        args = (tuple(input_shape), num_classes)
    _check_kwargs(builder, kwargs, what, positional=args, given=shape)
    try:
        model = builder(*args, **shape, **kwargs)
    except ConfigError:
        raise
    except Exception as exc:
        if cfg.architecture:  # the kwargs fit its signature (checked above): the user's class itself failed
            raise ConfigError("model.architecture", f"a class whose constructor succeeds ({what}(**{kwargs!r}) "
                                                    f"raised {type(exc).__name__}: {exc})", show_got=False) from None
        if not isinstance(exc, (TypeError, ValueError)):
            raise
        # The kwargs are the only user input here, so a type/value error is theirs to fix.
        raise ConfigError("model.kwargs", f"values {what} accepts ({type(exc).__name__}: {exc})",
                          kwargs) from None
    if not isinstance(model, nn.Module):
        raise ConfigError("model.architecture", f"a 'module:Class' that builds a torch.nn.Module "
                                                f"(it built a {type(model).__name__})", cfg.architecture)
    return model


@contextlib.contextmanager
def classifier_inputs(model: nn.Module, transform: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
                      ) -> Iterator[list[torch.Tensor]]:
    """While open, collects the final classifier layer's inputs (flattened to (batch, features), then
    ``transform``ed), one tensor per forward pass: the penultimate features."""
    module = model.get_submodule(classifier_parameter_names(model)[0].rpartition(".")[0])
    captured: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda m, inputs, output: captured.append(transform(inputs[0].flatten(1))))
    try:
        yield captured
    finally:
        handle.remove()


def model_stages(model: nn.Module) -> list[nn.Module] | None:
    """The model as a chain of modules whose composition is its forward pass, or None if unknown.

    Registry models say so with a ``stages()`` method (your own architecture may define one too); an
    ``nn.Sequential`` is its children. Evaluation uses the chain to start candidates' forward passes
    after the layers a mutation cannot touch.
    """
    if hasattr(model, "stages"):
        return list(model.stages())
    if isinstance(model, nn.Sequential):
        return list(model)
    return None
