"""Two small registries filled by decorators: encoders (by name) and architectures (by `model.arch`).

Each family file registers one short function per variant, so no list of names is kept by hand:

    @register_encoder("resnet50", kind="cnn")
    def resnet50(**kwargs) -> ResNet: ...

`kind` says which decoders an encoder can feed: "cnn" (a stride-4 .. stride-32 feature pyramid,
for DeepLabV3+) or "vit" (patch tokens of several blocks, for DPT).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from s4seg.errors import ParamsError


@dataclass(frozen=True)
class EncoderEntry:
    name: str
    kind: str  # cnn | vit
    build: Callable[..., Any]
    module: str
    # Returns the path of ImageNet weights shipped by an installed package (`model.weights: package`)
    package_weights: Callable[[], Any] | None = None


_ENCODERS: dict[str, EncoderEntry] = {}
_ARCHS: dict[str, Callable[..., Any]] = {}


def register_encoder(
    name: str, kind: str, package_weights: Callable[[], Any] | None = None
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in _ENCODERS:
            raise RuntimeError(f"encoder {name!r} registered twice ({_ENCODERS[name].module}, {fn.__module__})")
        _ENCODERS[name] = EncoderEntry(name, kind, fn, fn.__module__, package_weights)
        return fn

    return wrap


def register_arch(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in _ARCHS:
            raise RuntimeError(f"architecture {name!r} registered twice")
        _ARCHS[name] = fn
        return fn

    return wrap


def encoder_names(kind: str | None = None) -> list[str]:
    return sorted(n for n, e in _ENCODERS.items() if kind is None or e.kind == kind)


def arch_names() -> list[str]:
    return sorted(_ARCHS)


def get_encoder(name: str, kind: str | None = None, arch: str | None = None) -> EncoderEntry:
    """The registered encoder `name`; with `kind`, it must be of that kind (named after `arch`)."""
    entry = _ENCODERS.get(name)
    if entry is None:
        raise ParamsError(
            f"model.encoder: {name!r} is not a registered encoder; choose one of: {', '.join(encoder_names())}"
        )
    if kind is not None and entry.kind != kind:
        raise ParamsError(
            f"model.encoder: {name!r} cannot be used with model.arch {arch!r}; "
            f"choose one of: {', '.join(encoder_names(kind))}"
        )
    return entry


def get_arch(name: str) -> Callable[..., Any]:
    if name not in _ARCHS:
        raise ParamsError(
            f"model.arch: {name!r} is not a registered architecture; choose one of: {', '.join(arch_names())}"
        )
    return _ARCHS[name]
