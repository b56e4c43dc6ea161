"""`tile` stage: scenes -> tiles.zarr + split.parquet (reads the dataset, tiling and split sections).

    python stages/tile.py --params params.yaml --tiles data/tiles.zarr --split data/split.parquet

Both outputs are written to temporary siblings and renamed on success, so bad input (reported as one
`error: ...` line, exit status 2) leaves the previous outputs as they were.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from s4seg.cli import run_stage
from s4seg.data.tiling import tile_main


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--tiles", required=True, help="output tile store (data/tiles.zarr)")
    parser.add_argument("--split", required=True, help="output split table (data/split.parquet)")
    args = parser.parse_args(argv)
    tile_main(args.params, args.tiles, args.split)


if __name__ == "__main__":
    run_stage(main)
