"""LoveDA (Wang et al., NeurIPS 2021 datasets track): urban and rural 1024 x 1024 tiles, index masks."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from s4seg.config import IGNORE_INDEX, DatasetConfig
from s4seg.data.sources.base import (
    IdMap,
    Scene,
    Source,
    check_same_size,
    read_image,
    read_index_mask,
    register_source,
    require_root,
)
from s4seg.errors import DataError, DatasetNotFoundError, ParamsError

DOMAINS = ("Urban", "Rural")
SPLITS = ("Train", "Val")


@register_source("loveda")
class LoveDASource(Source):
    """LoveDA, laid out as in the official archives (Train.zip, Val.zip unpacked under `dataset.root`)::

        Train/Urban/images_png/{id}.png    RGB image
        Train/Urban/masks_png/{id}.png     index mask: 0 no-data, 1 background, 2 building, 3 road,
                                           4 water, 5 barren, 6 forest, 7 agricultural
        Train/Rural/...   Val/Urban/...   Val/Rural/...

    Mask ids 1..7 become class ids 0..6 and the no-data id 0 becomes 255 (ignored). Scene names are
    `{Train|Val}/{Urban|Rural}/{id}`; `dataset.loveda_domains` picks Urban, Rural or both. The
    official Test split has no public masks and is not read. Default test scenes: all of Val.
    """

    classes = ("background", "building", "road", "water", "barren", "forest", "agricultural")
    # The colours of the LoveDA toolkit's visualisation.
    palette = ("#FFFFFF", "#FF0000", "#FFFF00", "#0000FF", "#9F81B7", "#00FF00", "#FFC380")
    default_test_scenes = ("Val/*",)

    def __init__(self, cfg: DatasetConfig) -> None:
        bad = [d for d in cfg.loveda_domains if d not in DOMAINS]
        if bad or not cfg.loveda_domains:
            raise ParamsError(f"dataset.loveda_domains = {list(cfg.loveda_domains)}: expected some of {list(DOMAINS)}")
        self.root = require_root(cfg)
        self.pairs: list[tuple[str, Path, Path]] = []
        for split in SPLITS:
            for domain in cfg.loveda_domains:
                folder = self.root / split / domain
                if not (folder / "images_png").is_dir():
                    raise DatasetNotFoundError(
                        f"{folder / 'images_png'}: folder not found; expected the LoveDA layout "
                        f"{{Train,Val}}/{{Urban,Rural}}/images_png and masks_png under {self.root}"
                    )
                for image in sorted((folder / "images_png").glob("*.png"), key=lambda p: (len(p.stem), p.stem)):
                    mask = folder / "masks_png" / image.name
                    if not mask.is_file():
                        raise DataError(f"{image}: no mask {mask}; every LoveDA Train/Val image has one")
                    self.pairs.append((f"{split}/{domain}/{image.stem}", image, mask))
        if not self.pairs:
            raise DataError(f"{self.root}: no LoveDA images found under {{Train,Val}}/{{Urban,Rural}}/images_png")
        # 0 = no-data -> ignore; 1..7 -> 0..6.
        self.ids = IdMap(len(self.classes), {i: i - 1 for i in range(1, 8)} | {0: IGNORE_INDEX}, (),
                         where="loveda")

    def scene_names(self) -> list[str]:
        return [name for name, _, _ in self.pairs]

    def scenes(self) -> Iterator[Scene]:
        for name, image_path, mask_path in self.pairs:
            image = read_image(image_path)
            ids = read_index_mask(mask_path)
            check_same_size(image, ids, image_path, mask_path)
            yield Scene(name, image, self.ids(ids, mask_path))
