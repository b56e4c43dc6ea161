"""Training data: tile datasets, paired labeled/unlabeled sampling, and collation into a `Batch`.

Sampling follows UniMatch (`reference/unimatch_v1_fixmatch.md` §1.1): an epoch is one pass over the
unlabeled tiles; the labeled tiles are repeated to the same length; a second, independently shuffled
unlabeled stream supplies the CutMix partner. With `labeled_only` (the supervised warmup) an epoch is
one pass over the labeled tiles and no unlabeled stream exists.

Determinism and resume: every sample is keyed by (stream, epoch, slot), where slot is its position in
the epoch's global list, and its augmentation is drawn from a generator seeded with
(seed, stream, epoch, slot). A run's data is therefore a pure function of the seed and the micro-batch
index: resuming at micro-batch k needs nothing but k, whatever `num_workers` and however the epoch
was cut. Sharding over ranks follows `torch.utils.data.DistributedSampler` (the global list is split
round-robin, rank::world_size) and is written out here so that each item carries its key.

Deviation from the official code: the labeled list of an epoch is a concatenation of independent
shuffles of the labeled ids, truncated to the epoch length, so every labeled tile appears floor(n/N_l)
or ceil(n/N_l) times; UniMatch repeats the fixed id list and truncates it before shuffling, which
always drops the same tail tiles.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from s4seg.data.augment import cutmix_box, strong_augment, weak_augment
from s4seg.data.store import TileStore
from s4seg.engine.method import Batch
from s4seg.errors import DataError

STREAM_LABELED, STREAM_UNLABELED, STREAM_PARTNER = 0, 1, 2


def sample_generator(seed: int, stream: int, epoch: int, slot: int) -> torch.Generator:
    """The generator of one sample's augmentation: a function of its key only."""
    state = np.random.SeedSequence([seed, stream, epoch, slot]).generate_state(2, dtype=np.uint32)
    g = torch.Generator()
    g.manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)
    return g


class _TileDataset(Dataset):
    """Shared tile reading. Holds the store path and reopens it lazily in each worker process."""

    def __init__(self, store: TileStore | str | Path, ids: Sequence[int], crop: int,
                 scale_range: tuple[float, float], seed: int) -> None:
        self.path = Path(store.path if isinstance(store, TileStore) else store)
        self._store = store if isinstance(store, TileStore) else None
        self.ids = np.asarray(ids, dtype=np.int64)
        self.crop = crop
        self.scale_range = tuple(scale_range)
        self.seed = seed

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_store"] = None  # zarr handles are reopened in the worker rather than pickled
        return state

    @property
    def store(self) -> TileStore:
        if self._store is None:
            self._store = TileStore(self.path)
        return self._store

    def __len__(self) -> int:
        return len(self.ids)

    def read(self, tile_id: int) -> tuple[Tensor, Tensor]:
        """Un-augmented tile: image (3, T, T) float in [0, 1], mask (T, T) int64."""
        image = torch.from_numpy(self.store.image(tile_id)).permute(2, 0, 1).float().div_(255.0)
        mask = torch.from_numpy(self.store.mask(tile_id).astype(np.int64))
        return image, mask


class LabeledTiles(_TileDataset):
    """Weakly augmented labeled tiles: {"image" (3, crop, crop) float [0, 1], "mask" (crop, crop) int64, "id"}."""

    stream = STREAM_LABELED

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.sample(int(self.ids[index]), epoch=0, slot=index)

    def sample(self, tile_id: int, epoch: int, slot: int) -> dict[str, Any]:
        g = sample_generator(self.seed, self.stream, epoch, slot)
        image, mask = self.read(tile_id)
        image, mask, _ = weak_augment(image, mask, self.crop, self.scale_range, g)
        return {"image": image, "mask": mask, "id": tile_id}


class UnlabeledTiles(_TileDataset):
    """Unlabeled tiles with all views sharing one geometric transform.

    {"u_w", "u_s1", "u_s2"} (3, crop, crop); "valid" (crop, crop) bool, False on padding;
    "box1", "box2" (crop, crop) bool CutMix boxes; "y_u" the hidden ground truth (monitoring only); "id".
    """

    stream = STREAM_UNLABELED

    def __init__(self, *args: Any, stream: int = STREAM_UNLABELED, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stream = stream

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.sample(int(self.ids[index]), epoch=0, slot=index)

    def sample(self, tile_id: int, epoch: int, slot: int) -> dict[str, Any]:
        g = sample_generator(self.seed, self.stream, epoch, slot)
        image, mask = self.read(tile_id)
        u_w, y_u, valid = weak_augment(image, mask, self.crop, self.scale_range, g)
        u_s1 = strong_augment(u_w, g)
        box1 = cutmix_box(self.crop, g)
        u_s2 = strong_augment(u_w, g)
        box2 = cutmix_box(self.crop, g)
        return {"u_w": u_w, "u_s1": u_s1, "u_s2": u_s2, "valid": valid, "box1": box1, "box2": box2,
                "y_u": y_u, "id": tile_id}


# --------------------------------------------------------------------------------------------------
# Pairing and sampling
# --------------------------------------------------------------------------------------------------
def _tiled_shuffles(ids: np.ndarray, length: int, rng: np.random.Generator) -> np.ndarray:
    """Concatenate independent shuffles of `ids` until `length` entries, then truncate."""
    reps = -(-length // len(ids))
    return np.concatenate([rng.permutation(ids) for _ in range(reps)])[:length]


@dataclass(frozen=True)
class Key:
    """One training item: which tiles, in which epoch and at which global slot."""

    epoch: int
    slot: int
    labeled: int
    unlabeled: int = -1  # -1: no unlabeled stream
    partner: int = -1


class PairedSchedule:
    """Which tiles each micro-batch of each epoch reads, on this rank.

    batches_per_epoch = max(1, N // (batch_size * world_size)) with N = the unlabeled count (or the
    labeled count if `labeled_only`); the incomplete last batch is dropped, as with drop_last=True.
    """

    def __init__(self, labeled_ids: Sequence[int], unlabeled_ids: Sequence[int], batch_size: int, seed: int,
                 *, labeled_only: bool = False, load_unlabeled: bool = True, rank: int = 0,
                 world_size: int = 1) -> None:
        self.labeled_ids = np.asarray(labeled_ids, dtype=np.int64)
        self.unlabeled_ids = np.asarray(unlabeled_ids, dtype=np.int64)
        if len(self.labeled_ids) == 0:
            raise DataError("the split has no labeled tiles; raise split.labeled or check split.parquet")
        if not labeled_only and len(self.unlabeled_ids) == 0:
            raise DataError("the split has no unlabeled tiles; semi-supervised training needs some "
                            "(lower split.labeled below 1)")
        self.batch_size, self.seed = batch_size, seed
        self.labeled_only = labeled_only
        self.load_unlabeled = load_unlabeled and not labeled_only
        self.rank, self.world_size = rank, world_size
        base = len(self.labeled_ids) if labeled_only else len(self.unlabeled_ids)
        self.batches_per_epoch = max(1, base // (batch_size * world_size))
        self.samples_per_epoch = self.batches_per_epoch * batch_size * world_size
        self._cache: tuple[int, list[Key]] | None = None

    def epoch_keys(self, epoch: int) -> list[Key]:
        """This rank's keys of `epoch`, in order (global list sharded rank::world_size)."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        rng = np.random.default_rng([self.seed, epoch])
        n = self.samples_per_epoch
        if self.labeled_only:
            labeled = _tiled_shuffles(self.labeled_ids, n, rng)
            unlabeled = partner = np.full(n, -1)
        else:
            unlabeled = _tiled_shuffles(self.unlabeled_ids, n, rng)
            labeled = _tiled_shuffles(self.labeled_ids, n, rng)
            partner = _tiled_shuffles(self.unlabeled_ids, n, rng)
            if not self.load_unlabeled:  # supervised on the semi-supervised schedule
                unlabeled = partner = np.full(n, -1)
        keys = [Key(epoch, s, int(labeled[s]), int(unlabeled[s]), int(partner[s]))
                for s in range(self.rank, n, self.world_size)]
        self._cache = (epoch, keys)
        return keys

    def batch_keys(self, index: int) -> list[Key]:
        """Keys of micro-batch `index` counted from the start of training (across epochs)."""
        epoch, j = divmod(index, self.batches_per_epoch)
        return self.epoch_keys(epoch)[j * self.batch_size : (j + 1) * self.batch_size]


class MicroBatchSampler(Sampler):
    """Batch sampler yielding the keys of micro-batches [start, stop) of a `PairedSchedule`."""

    def __init__(self, schedule: PairedSchedule, start: int, stop: int) -> None:
        self.schedule, self.start, self.stop = schedule, start, stop

    def __iter__(self) -> Iterator[list[Key]]:
        for index in range(self.start, self.stop):
            yield self.schedule.batch_keys(index)

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


class PairedTiles(Dataset):
    """Maps a `Key` to {"l": labeled sample, "u": unlabeled sample, "m": CutMix partner sample}."""

    def __init__(self, labeled: LabeledTiles, unlabeled: UnlabeledTiles | None,
                 partner: UnlabeledTiles | None) -> None:
        self.labeled, self.unlabeled, self.partner = labeled, unlabeled, partner

    def __len__(self) -> int:
        return len(self.labeled)

    def __getitem__(self, key: Key) -> dict[str, Any]:
        item = {"l": self.labeled.sample(key.labeled, key.epoch, key.slot)}
        if self.unlabeled is not None and key.unlabeled >= 0:
            item["u"] = self.unlabeled.sample(key.unlabeled, key.epoch, key.slot)
            item["m"] = self.partner.sample(key.partner, key.epoch, key.slot)
        return item


def collate(items: list[dict[str, Any]]) -> Batch:
    """Stack samples into a `Batch`; unlabeled fields stay None when no unlabeled stream is loaded."""
    def stack(stream: str, key: str) -> Tensor:
        return torch.stack([it[stream][key] for it in items])

    batch = Batch(x=stack("l", "image"), y=stack("l", "mask"))
    if "u" in items[0]:
        batch.u_w, batch.u_s1, batch.u_s2 = stack("u", "u_w"), stack("u", "u_s1"), stack("u", "u_s2")
        batch.box1, batch.box2, batch.valid_u = stack("u", "box1"), stack("u", "box2"), stack("u", "valid")
        batch.y_u = stack("u", "y_u")
        batch.ids_u = torch.tensor([it["u"]["id"] for it in items], dtype=torch.int64)
        batch.u_w_mix, batch.u_s1_mix, batch.u_s2_mix = stack("m", "u_w"), stack("m", "u_s1"), stack("m", "u_s2")
        batch.valid_u_mix, batch.y_u_mix = stack("m", "valid"), stack("m", "y_u")
    return batch


def make_loader(
    store: TileStore,
    schedule: PairedSchedule,
    *,
    crop: int,
    scale_range: tuple[float, float],
    seed: int,
    start: int,
    stop: int,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> torch.utils.data.DataLoader:
    """A DataLoader over micro-batches [start, stop) of `schedule`, yielding `Batch`es."""
    labeled = LabeledTiles(store, schedule.labeled_ids, crop, scale_range, seed)
    unlabeled = partner = None
    if schedule.load_unlabeled:
        unlabeled = UnlabeledTiles(store, schedule.unlabeled_ids, crop, scale_range, seed)
        partner = UnlabeledTiles(store, schedule.unlabeled_ids, crop, scale_range, seed, stream=STREAM_PARTNER)
    return torch.utils.data.DataLoader(
        PairedTiles(labeled, unlabeled, partner),
        batch_sampler=MicroBatchSampler(schedule, start, stop),
        collate_fn=collate,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        # Its own generator: creating an iterator draws a worker base seed, which must not consume the
        # global torch RNG (the method's dropout stream), or a resumed run would diverge.
        generator=torch.Generator().manual_seed(seed),
    )
