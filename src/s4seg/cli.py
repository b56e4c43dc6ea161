"""`s4seg ...`: the command line, and the error handling every stage script shares.

    s4seg tile      [--params params.yaml] [--tiles data/tiles.zarr] [--split data/split.parquet]
    s4seg inspect   dumps/pseudo.zarr (--tile ID | --scene NAME) -o out.png | --summary
    s4seg bench     train [--methods fixmatch,unimatch,...] [--iters N] [--batch B] [--crop C] [--precision P]
                          [--threads T] [--reference]  each method in fp32 and on the fast path (channels_last,
                          bf16 where native); --reference: UniMatch's configuration
    s4seg predict   [--model models/student.pt] IMAGE|FOLDER|GLOB... -o OUT_DIR [--color] [--window W] ...
    s4seg preset    NAME [--run]  the `-S ++key=value` overrides of a preset; --run runs `dvc exp run` with them.
                                  The budget they give (warmup and train steps or epochs, train.init) goes to stderr.
    s4seg baseline  [-o baselines/<method>.json]  save the finished run's metrics, steps and params as a
                                  baseline for `report.baseline` (s4seg.report.baseline)
    s4seg methods                 lists the registered methods

An `S4segError` is printed as one line (`error: ...`) and exits with status 2; any other exception keeps
its traceback, since it is a bug rather than bad input.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from s4seg.errors import ParamsError, S4segError

PRESETS_DIR = Path(__file__).parent / "presets"


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def run_stage(main: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None = None) -> None:
    """Run a stage's `main`, turning an S4segError into one line on stderr and exit status 2."""
    setup_logging()
    try:
        main(argv)
    except S4segError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def hydra_value(value: Any) -> str:
    """A YAML value in Hydra's override grammar, which `dvc exp run -S` parses: every string quoted."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, list):
        return "[" + ", ".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {hydra_value(v)}" for k, v in value.items()) + "}"
    raise ParamsError(f"preset value {value!r}: expected a string, number, boolean, null, list or mapping")


def preset_args(name: str) -> list[str]:
    """`-S ++key=value` pairs of a preset file (flattened dotted keys) for `dvc exp run`.

    `++` adds a key that params.yaml lacks and overrides one it has.
    """
    path = PRESETS_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))
        raise ParamsError(f"preset {name!r} not found in {PRESETS_DIR}; choose one of: {', '.join(known)}")

    def flatten(prefix: str, value: Any) -> list[str]:
        if isinstance(value, dict):
            return [a for k, v in value.items() for a in flatten(f"{prefix}.{k}" if prefix else k, v)]
        return ["-S", f"++{prefix}={hydra_value(value)}"]

    return flatten("", yaml.safe_load(path.read_text()) or {})


def budget_note(name: str, preset: dict[str, Any], params: dict[str, Any] | None) -> str:
    """One line on the budget a preset runs with: warmup and train length and where train starts.

    Keys the preset leaves alone come from `params` (the workspace's params.yaml, when there is one).
    """
    params = params or {}

    def value(section: str, key: str) -> tuple[Any, str]:
        if key in (preset.get(section) or {}):
            return preset[section][key], "preset"
        return (params.get(section) or {}).get(key), "params.yaml"

    parts = []
    for section in ("warmup", "train"):
        iterations, source = value(section, "iterations")
        if iterations is not None:
            parts.append(f"{section} {iterations} steps ({source} {section}.iterations)")
            continue
        epochs, source = value(section, "epochs")
        if epochs is not None:
            parts.append(f"{section} {epochs} epochs ({source} {section}.epochs; steps depend on the tile count)")
    init, source = value("train", "init")
    if init is not None:
        parts.append(f"train starts from {init} ({source} train.init)")
    return (f"preset {name}: " + ", ".join(parts) + ". warmup and train log their plan (steps) when they start, "
            "and a time estimate after the first steps.")


def _cmd_tile(args: argparse.Namespace) -> None:
    from s4seg.data.tiling import tile_main

    tile_main(args.params, args.tiles, args.split)


def _cmd_inspect(args: argparse.Namespace) -> None:
    from s4seg.report import inspect

    if args.summary:
        print(inspect.summary(args.dump))
        return
    if args.output is None or (args.tile is None) == (args.scene is None):
        raise ParamsError("s4seg inspect: give exactly one of --tile ID or --scene NAME, and -o OUT.png (or --summary)")
    if args.tile is not None:
        inspect.inspect_tile(args.dump, args.tiles, args.tile, args.output)
    else:
        inspect.inspect_scene(args.dump, args.tiles, args.scene, args.output)
    print(args.output)


def _cmd_bench(args: argparse.Namespace) -> None:
    from s4seg.config import load_params
    from s4seg.engine.bench import REFERENCE, bench_train, reference_params

    params = load_params(args.params)
    methods = args.methods.split(",") if args.methods else None
    batch, crop, classes, out = args.batch or 4, args.crop or 192, 6, args.out or "reports/bench/train.json"
    if args.reference:  # UniMatch's configuration; --batch / --crop / --methods still override
        params = reference_params(params)
        batch, crop = args.batch or REFERENCE["batch"], args.crop or REFERENCE["crop"]
        classes = REFERENCE["num_classes"]
        methods = methods or list(REFERENCE["methods"])
        out = args.out or "reports/bench/reference.json"
    bench_train(methods, params, batch=batch, crop=crop, iters=args.iters, out_json=out, precision=args.precision,
                num_classes=classes, threads=args.threads)


def _cmd_predict(args: argparse.Namespace) -> None:
    from s4seg.predict import PredictOptions, predict_files

    given = {"window": args.window, "overlap": args.overlap, "batch_size": args.batch,
             "max_memory_mb": args.max_memory_mb}
    options = PredictOptions(color=args.color, **{k: v for k, v in given.items() if v is not None})
    for result in predict_files(args.model, args.inputs, args.output, options, device=args.device,
                                precision=args.precision):
        print(result.outputs["mask"])


def _cmd_methods(args: argparse.Namespace) -> None:
    from s4seg.methods import registered_methods

    print("\n".join(registered_methods()))


def _cmd_baseline(args: argparse.Namespace) -> None:
    from s4seg.report.baseline import save_baseline

    out = args.output
    if out is None:
        params = yaml.safe_load(Path(args.params).read_text()) if Path(args.params).is_file() else {}
        out = Path("baselines") / f"{(params or {}).get('method', 'baseline')}.json"
    print(save_baseline(args.summary, args.params, args.train_log, out))


def _cmd_preset(args: argparse.Namespace) -> None:
    overrides = preset_args(args.name)
    preset = yaml.safe_load((PRESETS_DIR / f"{args.name}.yaml").read_text()) or {}
    workspace = Path("params.yaml")
    params = yaml.safe_load(workspace.read_text()) if workspace.is_file() else None
    # stderr: stdout is the overrides alone, for `eval "dvc exp run $(s4seg preset NAME)"`
    print(budget_note(args.name, preset, params), file=sys.stderr)
    if not args.run:
        print(shlex.join(overrides))
        return
    import subprocess

    cmd = ["dvc", "exp", "run", *overrides, *args.dvc_args]
    print(shlex.join(cmd), file=sys.stderr)
    sys.exit(subprocess.call(cmd))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="s4seg", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("tile", help="tile the dataset of params.yaml into a zarr store and a split table")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--tiles", default="data/tiles.zarr")
    p.add_argument("--split", default="data/split.parquet")
    p.set_defaults(func=_cmd_tile)

    p = sub.add_parser("inspect", help="render or summarise a pseudo-label dump")
    p.add_argument("dump", help="dumps/pseudo.zarr")
    p.add_argument("--tiles", default="data/tiles.zarr")
    p.add_argument("--tile", type=int)
    p.add_argument("--scene")
    p.add_argument("-o", "--output")
    p.add_argument("--summary", action="store_true", help="print per-class pseudo-label quality")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("bench", help="benchmarks")
    p.add_argument("what", choices=["train"])
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--methods", help="comma-separated; default: every registered method")
    p.add_argument("--batch", type=int, help="tiles per batch (default 4; 2 with --reference)")
    p.add_argument("--crop", type=int, help="crop size (default 192; 321 with --reference)")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--precision", default="auto", help="of the fast path: auto (bf16 where native) | fp32 | bf16 | "
                   "fp16; fp32 shows the fallback of hardware without bf16 (channels_last alone)")
    p.add_argument("--reference", action="store_true",
                   help="UniMatch's reference configuration: DeepLabV3+ ResNet-50 deep stem, random init, 21 classes, "
                        "crop 321, batch 2; methods supervised,unimatch unless --methods")
    p.add_argument("--threads", type=int, help="torch threads per run (default: one per core); 1 on a loaded machine")
    p.add_argument("--out", help="default reports/bench/train.json (reference.json with --reference)")
    p.set_defaults(func=_cmd_bench)

    # Unset numeric flags take s4seg.predict.PredictOptions' defaults (evaluate's); it imports torch, so not here.
    p = sub.add_parser("predict", help="map images (JPEG, PNG, TIFF, GeoTIFF; any size) with a trained model",
                       description="Writes NAME.mask, NAME.conf (confidence x255), NAME.preview.png and with --color "
                                   "NAME.color for each image; TIFF in, georeferenced TIFF out.")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or globs (quote a glob with **)")
    p.add_argument("-o", "--output", required=True, metavar="OUT_DIR")
    p.add_argument("--model", default="models/student.pt", help="an s4seg model file (default: %(default)s)")
    p.add_argument("--color", action="store_true", help="also write the mask in the class palette")
    p.add_argument("--device", default="auto", help="auto (cuda if present) | cpu | cuda | cuda:N")
    p.add_argument("--precision", default="auto",
                   help="auto (bf16 where native, else fp32; as evaluate) | fp32 | bf16 | fp16 (CUDA)")
    p.add_argument("--batch", type=int, help="windows per forward pass (default: 8, as evaluate)")
    p.add_argument("--window", type=int, help="sliding-window side in pixels (default: 256, the default tile size)")
    p.add_argument("--overlap", type=float, help="share of a window its neighbour covers (default: 1/3, as evaluate)")
    p.add_argument("--max-memory-mb", type=float,
                   help="a TIFF whose image and outputs need more is read and written row by row (default: 2048)")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("preset", help="print (or --run) the `dvc exp run -S` overrides of a preset")
    p.add_argument("name", help="e.g. paper, dubai")
    p.add_argument("--run", action="store_true", help="run `dvc exp run` with them")
    p.add_argument("dvc_args", nargs=argparse.REMAINDER, help="more `dvc exp run` arguments (after --run)")
    p.set_defaults(func=_cmd_preset)

    p = sub.add_parser("baseline", help="save the finished run's metrics, steps and params for report.baseline")
    p.add_argument("--summary", default="metrics/summary.json")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--train-log", default="logs/train.csv", help="gives the run's number of steps")
    p.add_argument("-o", "--output", type=Path, help="default: baselines/<method>.json")
    p.set_defaults(func=_cmd_baseline)

    p = sub.add_parser("methods", help="list registered methods")
    p.set_defaults(func=_cmd_methods)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        args.func(args)
    except S4segError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except BrokenPipeError:  # `s4seg inspect --summary | head`: the reader left, nothing is wrong
        sys.stderr.close()
        sys.exit(0)


if __name__ == "__main__":
    main()
