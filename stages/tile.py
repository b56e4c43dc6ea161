"""Stage `tile`: scenes -> data/tiles.zarr + data/split.parquet (params: dataset, tiling, split)."""

from __future__ import annotations

import argparse
import logging
import sys

from s4seg.data.tiling import tile_main
from s4seg.errors import S4segError


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", required=True, help="params.yaml")
    parser.add_argument("--tiles", required=True, help="output tile store (zarr directory)")
    parser.add_argument("--split", required=True, help="output split table (parquet)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    tile_main(args.params, args.tiles, args.split)


if __name__ == "__main__":
    try:
        main()
    except S4segError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
