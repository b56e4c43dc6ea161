"""The `Method` interface the engine drives, its batch and outputs, and the method registry.

A method is an `nn.Module` that owns the segmentation model (`self.model`) and whatever extra
modules its paper defines (a projection head, an EMA teacher, a twin network). It computes losses;
the engine does everything else (data, optimiser, LR, EMA update, checkpoints, logging, DDP).

    @register_method("fixmatch")
    class FixMatch(Method):
        config_class = FixMatchConfig
        def training_step(self, batch, step): ...

The engine never imports a concrete method: `s4seg.methods` imports every method module, which
registers it, and `build_method` looks it up by name.

Composition: a method that is a loss term on top of another (IPixMatch: L = L_o + alpha L_IPix) subclasses
`AddOnMethod` with an `AddOnConfig`: it builds its base by name on the same model, calls the base's
`training_step` and reads what it needs from `StepOutput.streams`; the base keeps everything else.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from s4seg.config import from_dict, to_dict
from s4seg.errors import ParamsError


@dataclass
class Batch:
    """One training iteration's inputs. Images are float in [0, 1], (B, 3, H, W); the model normalises.

    Unlabeled fields are None for methods that do not use unlabeled data (`Method.uses_unlabeled`).
    All unlabeled views share one geometric transform, so they are pixel-aligned with each other.
    """

    x: Tensor  # labeled images (weak augmentation)
    y: Tensor  # (B, H, W) int64 labels, IGNORE_INDEX on void and padding
    u_w: Tensor | None = None  # unlabeled weak view
    u_s1: Tensor | None = None  # strong view 1 (photometric only; CutMix is applied by the method)
    u_s2: Tensor | None = None  # strong view 2
    box1: Tensor | None = None  # (B, H, W) bool CutMix box of view 1 (True = take the partner's pixel)
    box2: Tensor | None = None
    valid_u: Tensor | None = None  # (B, H, W) bool, False on padding
    # The CutMix partner: a second, independently augmented unlabeled batch (UniMatch V1's second loader)
    u_w_mix: Tensor | None = None
    u_s1_mix: Tensor | None = None
    u_s2_mix: Tensor | None = None
    valid_u_mix: Tensor | None = None
    # Hidden ground truth of the unlabeled tiles: for monitoring pseudo-label accuracy only, never a loss
    y_u: Tensor | None = None
    y_u_mix: Tensor | None = None
    ids_u: Tensor | None = None  # (B,) tile ids of the unlabeled batch

    def pin_memory(self) -> Batch:
        """Page-locked copy (DataLoader(pin_memory=True) calls this in its pinning thread)."""
        return Batch(**{f.name: (v.pin_memory() if isinstance(v, Tensor) else v)
                        for f in dataclasses.fields(self) for v in [getattr(self, f.name)]})

    def to(self, device: torch.device, memory_format: torch.memory_format = torch.preserve_format) -> Batch:
        """On `device`; images (the 4-D fields) in `memory_format` (s4seg.runtime.Runtime.memory_format)."""
        def move(v: Tensor) -> Tensor:
            if v.ndim == 4:
                return v.to(device, non_blocking=True, memory_format=memory_format)
            return v.to(device, non_blocking=True)

        return Batch(**{f.name: (move(v) if isinstance(v, Tensor) else v)
                        for f in dataclasses.fields(self) for v in [getattr(self, f.name)]})


@dataclass
class PseudoLabels:
    """What a method trains on for a batch of unlabeled images (and what the dump stage writes)."""

    label: Tensor  # (B, H, W) int64 hard pseudo-label
    conf: Tensor  # (B, H, W) float confidence of `label`
    keep: Tensor  # (B, H, W) bool: this pixel contributes to the unlabeled loss
    regions: Tensor | None = None  # (B, H, W) int32 region ids, for region-based methods
    extra: dict[str, Tensor] = field(default_factory=dict)  # method-specific layers for the dump
    # (B, K, H, W) detached logits `label` and `conf` were taken from, for terms that need the whole
    # distribution (e.g. `StepOutput.streams`); never written by the dump
    logits: Tensor | None = None


@dataclass
class StepOutput:
    loss: Tensor  # scalar with grad; the engine calls backward on it for the main optimiser's parameters
    logs: dict[str, float | Tensor]  # every loss term by its paper symbol (loss_x, loss_u_s1, ...), thresholds
    pseudo: PseudoLabels | None = None  # pseudo-labels of the un-mixed weak view (for monitoring)
    # Losses of the method's auxiliary optimisers (`Method.aux_optimizers`), by the same names: the engine
    # back-propagates each into that optimiser's parameters only, and steps it after the main optimiser.
    aux_losses: dict[str, Tensor] = field(default_factory=dict)
    # Tensors of this step that a method built on top of this one may reuse (`AddOnMethod`, e.g. an extra
    # loss term on a base method's views). Keys are documented by the method that fills them (the
    # weak-to-strong methods: `s4seg.methods.losses`, "Streams").
    streams: dict[str, Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class AuxOptimizer:
    """An optimiser a method owns for an auxiliary network (e.g. a discriminator), stepped by the engine.

    `params` must not overlap the main optimiser's (the engine leaves them out of `trainable_groups`).
    The LR follows the main poly schedule when `poly` is true (same power, same step count).
    """

    params: list[nn.Parameter]
    kind: str = "adam"  # adam | sgd
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)  # adam
    momentum: float = 0.9  # sgd
    weight_decay: float = 0.0
    poly: bool = True


@dataclass(frozen=True)
class MethodConfig:
    """Base of every `XConfig`; a method with no hyper-parameters uses it as is."""


class Method(nn.Module):
    """Base class of every method. Subclasses set `config_class` and implement `training_step`."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type] = MethodConfig
    uses_unlabeled: ClassVar[bool] = True
    # The run's optimiser-step count, for schedules over training (a warm-up given as a share of the run).
    # The engine sets it before the first `training_step`; None outside a run. Methods must cope with None.
    total_steps: int | None = None

    def __init__(self, cfg: Any, model: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = model
        self.num_classes = num_classes

    # The engine calls these --------------------------------------------------------------------
    def training_step(self, batch: Batch, step: int) -> StepOutput:
        raise NotImplementedError

    @torch.no_grad()
    def predict(self, images: Tensor) -> Tensor:
        """Logits (B, K, H, W) for evaluation. Methods with a teacher or an ensemble override this."""
        return self.model(images)

    @torch.no_grad()
    def pseudo_labels(self, images: Tensor, valid: Tensor | None = None) -> PseudoLabels:
        """Hard pseudo-labels of weak views with the method's own selection rule (default: keep all valid)."""
        logits = self.predict(images)
        conf, label = logits.float().softmax(dim=1).max(dim=1)  # fp32 confidences under autocast
        keep = torch.ones_like(label, dtype=torch.bool) if valid is None else valid.bool()
        return PseudoLabels(label=label, conf=conf, keep=keep, logits=logits)

    def on_fit_start(self) -> None:
        """Called by `fit` once, before it resumes a checkpoint and before the first step. The train stage
        loads the init (warmup) weights into `self.model` after the method is built, so a network that must
        start from them (a twin of the model) copies them here. Default: nothing."""

    def teacher(self) -> nn.Module | None:
        """An EMA teacher the engine must update after each optimiser step, or None."""
        return None

    def networks(self) -> list[nn.Module]:
        """Every image-to-logits network the method keeps (student, teacher; a twin-network method adds
        its twin): the engine recomputes their BN statistics after training (s4seg.engine.precise_bn)."""
        teacher = self.teacher()
        return [self.model] + ([teacher] if teacher is not None else [])

    def ema_momentum(self) -> float:
        """Upper bound gamma of the EMA momentum min(1 - 1/(t+1), gamma)."""
        return 0.996

    def aux_optimizers(self) -> dict[str, AuxOptimizer]:
        """Optimisers of auxiliary networks (adversarial discriminators), by name; their losses come in
        `StepOutput.aux_losses` under the same names. The engine builds, steps, checkpoints them and
        averages their gradients over ranks. Default: none."""
        return {}

    def warm_head_params(self) -> list[nn.Parameter]:
        """Head parameters that still hold the init model's trained values when `fit` starts (after
        `on_fit_start`): with train.init warmup they form the LR group 'warm_head' (engine/optim.py).
        Default: the model's head. A method that re-draws a head at the start (RRN) leaves it out."""
        return list(self.model.param_groups().get("head", []))

    def trainable_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameter groups by LR role: 'backbone' gets lr, 'head' gets lr * lr_multi.

        Default: the model's own split; extra modules a method adds (projection heads) go to 'head',
        except the teacher's and the auxiliary optimisers' parameters.
        """
        groups = {k: list(v) for k, v in self.model.param_groups().items()}
        in_model = {id(p) for p in self.model.parameters()}
        teacher = self.teacher()
        in_teacher = {id(p) for p in teacher.parameters()} if teacher is not None else set()
        in_aux = {id(p) for aux in self.aux_optimizers().values() for p in aux.params}
        extra = [p for p in self.parameters() if id(p) not in in_model | in_teacher | in_aux]
        groups["head"] = groups.get("head", []) + extra
        return {k: [p for p in v if p.requires_grad] for k, v in groups.items()}


# ------------------------------------------------------------------------------------------------
# Composition: a loss term on top of a base method
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AddOnConfig(MethodConfig):
    """Base of the config of an `AddOnMethod`: the base method by name, and its own params section.

    `base_params` holds the keys of `methods.<base>` (validated by the base's config class) and is stored
    resolved, every key with its value, so the run hash and the model artifact name the whole base config.
    """

    base: str = ""
    base_params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.base not in _METHODS:
            raise ParamsError(f"base {self.base!r} is not a registered method; choose one of: "
                              f"{', '.join(registered_methods())}")
        base_cfg = from_dict(_METHODS[self.base].config_class, self.base_params, where=f"base_params ({self.base})")
        object.__setattr__(self, "base_params", to_dict(base_cfg))


class AddOnMethod(Method):
    """A method made of a base method plus its own loss terms (L = L_base + ...).

    It builds the base by name on the same `model`, so the base's extra networks (an EMA teacher) live inside
    this module, calls the base's `training_step` and reads the tensors it needs from `StepOutput.streams`.
    The base owns the model, which is registered once, inside it (state-dict keys `base.model.*`,
    `base.ema_model.*`); `predict`, `pseudo_labels`, `teacher`, `networks`, `ema_momentum`, `aux_optimizers`
    and `uses_unlabeled` are the base's, and `trainable_groups` the base's plus the add-on's own parameters
    (in 'head'). `total_steps` set by the engine reaches the base too.
    """

    base: Method

    def __init__(self, cfg: AddOnConfig, model: nn.Module, num_classes: int) -> None:
        super().__init__(cfg, model, num_classes)
        del self.model  # registered once, in the base: one copy of every weight in the state dict
        self.base = build_method(cfg.base, cfg.base_params, model, num_classes)
        self.uses_unlabeled = self.base.uses_unlabeled

    @property
    def model(self) -> nn.Module:  # type: ignore[override]
        return self.base.model

    @property
    def total_steps(self) -> int | None:  # type: ignore[override]
        return self.base.total_steps

    @total_steps.setter
    def total_steps(self, steps: int | None) -> None:
        self.base.total_steps = steps

    @torch.no_grad()
    def predict(self, images: Tensor) -> Tensor:
        return self.base.predict(images)

    @torch.no_grad()
    def pseudo_labels(self, images: Tensor, valid: Tensor | None = None) -> PseudoLabels:
        return self.base.pseudo_labels(images, valid)

    def teacher(self) -> nn.Module | None:
        return self.base.teacher()

    def on_fit_start(self) -> None:
        self.base.on_fit_start()

    def networks(self) -> list[nn.Module]:
        return self.base.networks()

    def ema_momentum(self) -> float:
        return self.base.ema_momentum()

    def aux_optimizers(self) -> dict[str, AuxOptimizer]:
        return self.base.aux_optimizers()

    def trainable_groups(self) -> dict[str, list[nn.Parameter]]:
        groups = self.base.trainable_groups()
        in_base = {id(p) for p in self.base.parameters()}
        own = [p for p in self.parameters() if id(p) not in in_base and p.requires_grad]
        if own:
            groups["head"] = groups.get("head", []) + own
        return groups


# ------------------------------------------------------------------------------------------------
# Registry
# ------------------------------------------------------------------------------------------------
_METHODS: dict[str, type[Method]] = {}


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    def wrap(cls: type[Method]) -> type[Method]:
        if name in _METHODS and _METHODS[name] is not cls:
            raise RuntimeError(f"method {name!r} registered twice ({_METHODS[name]} and {cls})")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return wrap


def registered_methods() -> list[str]:
    return sorted(_METHODS)


def method_class(name: str) -> type[Method]:
    if name not in _METHODS:
        raise ParamsError(
            f"params.yaml: method {name!r} is not registered; choose one of: {', '.join(registered_methods())}"
        )
    return _METHODS[name]


def method_config(name: str, section: dict[str, Any] | None) -> Any:
    """Validate `methods.<name>` against the method's config class."""
    return from_dict(method_class(name).config_class, section or {}, where=f"params.yaml: methods.{name}")


def build_method(name: str, section: dict[str, Any] | None, model: nn.Module, num_classes: int) -> Method:
    return method_class(name)(method_config(name, section), model, num_classes)
