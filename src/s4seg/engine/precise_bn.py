"""PreciseBN: recompute BatchNorm running statistics after training, identically for every method.

Why: a BN layer's running mean/var is an exponential average of per-batch statistics taken during
training; with the small batches of a CPU or single-GPU budget (4 + 4 here) that average is noisy, and
it is taken on augmented crops (rescaled, colour-jittered, CutMixed, feature-dropped) rather than on
images like those seen at inference. For weights that are an average of iterates (an EMA teacher),
no set of running statistics was ever measured on those weights: the blended buffers are a guess.
Wu & Johnson, "Rethinking 'Batch' in BatchNorm" (2021, §3: PreciseBN) and SWA (Izmailov et al. 2018,
`update_bn`) both re-estimate the statistics on the training images with the final weights.

Here: after the last step, every network the method keeps (student, EMA teacher, twins) is run in
train mode, without gradients, over the un-augmented training tiles, and its BN buffers become the
plain mean over those batches, as SWA's `torch.optim.swa_utils.update_bn` computes it, except that BN
layers a model keeps in eval mode while training (a frozen encoder's) keep their statistics (`update_bn`
would reset them, then normalise with the reset values). Which tiles (`train.precise_bn`):
`all` = labeled and unlabeled images of the split (no labels are read; the default, and the same
images for every method, so the supervised baseline gets the same statistics as the others),
`labeled` = the labeled tiles only, `off` = keep the running statistics of training.
Measured effect on the synthetic default: README "Measured on the embedded default". The papers'
models either have no BN (UniMatch V2's DPT) or train with SyncBN over 4 GPUs.
The weights are untouched and no RNG is drawn (the networks here have no dropout), so the training
run and its checkpoints do not change; only the final artifact's buffers do. The passes run in the
training's precision and memory format (`precision`, s4seg.runtime), so the statistics are those of the
activations the network computes; the buffers themselves stay fp32.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from s4seg.data.split import Split
from s4seg.data.store import TileStore
from s4seg.runtime import Runtime, make_runtime

log = logging.getLogger(__name__)

PRECISE_BN_CHOICES = ("all", "labeled", "off")


def precise_bn_tiles(split: Split, which: str) -> list[int]:
    """Tile ids whose images estimate the BN statistics for `train.precise_bn = which` (one of
    PRECISE_BN_CHOICES, checked with the rest of the schedule by `s4seg.engine.loop.validate`)."""
    if which == "off":
        return []
    ids = split.labeled.tolist() + (split.unlabeled.tolist() if which == "all" else [])
    return [int(i) for i in ids]


def batch_bounds(count: int, batch_size: int) -> list[tuple[int, int]]:
    """[start, stop) of consecutive batches; a last batch of one joins the one before it, because BN
    after global pooling (DeepLabV3+'s ASPP image branch) cannot take a batch of one in train mode."""
    bounds = [(start, min(start + batch_size, count)) for start in range(0, count, batch_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds[-2:] = [(bounds[-2][0], count)]
    return bounds


def _image_batches(store: TileStore, tile_ids: Sequence[int], batch_size: int, runtime: Runtime) -> Iterator[Tensor]:
    for start, stop in batch_bounds(len(tile_ids), batch_size):
        yield runtime.input(np.stack([store.image(i) for i in tile_ids[start:stop]]))


@torch.no_grad()
def recompute_bn_stats(nets: Sequence[nn.Module], store: TileStore, tile_ids: Sequence[int], *,
                       batch_size: int, device: torch.device, precision: str = "fp32") -> int:
    """Replace the BN running statistics of each of `nets` by their mean over `tile_ids`' images.

    Returns how many networks were recomputed. Each net keeps its train/eval mode. With fewer than
    two tiles nothing is recomputed (a batch of one has no variance after global pooling). The nets
    run on `device` in `precision` (s4seg.runtime; `fit` passes the training's resolved precision).
    """
    runtime = make_runtime(device, precision, where="precise_bn precision")
    if len(tile_ids) < 2:
        if tile_ids:
            log.warning("PreciseBN skipped: one training tile is not enough to estimate BN statistics")
        return 0
    done = 0
    for net in nets:
        was_training = net.training
        net.train()  # a model may keep parts in eval mode here (frozen encoder): those are left alone
        trained = [m for m in net.modules()
                   if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.training]
        momenta = {m: m.momentum for m in trained}
        for m in trained:
            m.reset_running_stats()
            m.momentum = None  # cumulative average: the plain mean over batches
        runtime.module(net)
        for images in _image_batches(store, tile_ids, batch_size, runtime) if trained else ():
            with runtime.autocast():
                net(images)
        for m, momentum in momenta.items():
            m.momentum = momentum
        net.train(was_training)
        done += bool(trained)
    return done
