"""Report sections of the dump stage: pseudo-label quality (order 60) and its evolution in training (order 70).

- "Pseudo-label quality" reads `metrics/pseudo.json` and `metrics/pseudo.parquet` (written by the dump stage)
  and shows the trained method's pseudo-labels next to the warmup model's: a table of the overall metrics
  with the gain, a per-class figure, accuracy against coverage as a confidence threshold sweeps
  (`metrics/pseudo_curve.csv`) with each model's own selection on it, and a few unlabeled tiles rendered like
  `s4seg inspect`.
- "Pseudo-labels during training" reads `dumps/snapshots.zarr` (written by the train stage): coverage and
  accuracy vs iteration, and one tile's pseudo-label over time.

Both are registered with `s4seg.report.base.register_section`, so `build_report` picks them up.
`pseudo_section(inputs, figures_dir)` renders them on their own, as Markdown plus the figure paths.
Metric definitions: `s4seg.evaluation.pseudo_quality`. Reads files only, no torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from s4seg.config import ReportConfig
from s4seg.evaluation.pseudo_quality import METRICS
from s4seg.evaluation.snapshots import snapshot_quality
from s4seg.report.base import Image, ReportContext, ReportInputs, Section, Table, Text, register_section
from s4seg.report.figures import colorize, legend_handles, model_color, new_figure
from s4seg.report.inspect import tile_figure

LABELS = {
    "accuracy": "accuracy of selected",
    "accuracy_all": "accuracy of all",
    "coverage": "coverage",
    "mining_ratio": "mining ratio",
    "effective_ratio": "effective ratio",
    "kept_share": "share of the kept pixels",
    "class_bias": "class mix gap (kept vs ground truth)",
    "propagated_coverage": "coverage added by propagation",
    "propagated_accuracy": "accuracy of what propagation added",
    "relabelled_coverage": "confident pixels propagation relabelled",
    "relabelled_accuracy": "their accuracy after relabelling",
    "relabelled_prior_accuracy": "their accuracy before relabelling",
    "threshold_coverage": "coverage of a threshold at equal accuracy",
    "region_accuracy": "region accuracy",
    "region_consistency": "region consistency",
    "regions": "regions",
}
MODELS = ("warmup", "student")
EXAMPLE_TILES = 3
STRIP_SNAPSHOTS = 8


def _overall(ctx: ReportContext) -> pd.DataFrame | None:
    """Rows = metrics, columns = warmup, student, gain (fractions; region counts as counts)."""
    table = ctx.read_parquet("pseudo")
    if table is not None:
        rows = table[table["class"] == "all"].pivot_table(index="metric", columns="model", values="value",
                                                          aggfunc="first", dropna=False)
    else:
        flat = ctx.read_json("pseudo_summary")
        if not flat:
            return None
        values: dict[str, dict[str, float]] = {}
        for key, value in flat.items():
            model, _, metric = key.partition(".")
            if model in MODELS:
                values.setdefault(model, {})[metric] = np.nan if value is None else value
        rows = pd.DataFrame(values)
    # kept_share is 1 overall by definition: a per-class metric only (the figure)
    rows = rows.reindex(index=[m for m in METRICS if m in rows.index and m != "kept_share"],
                        columns=[m for m in MODELS if m in rows.columns])
    rows = rows.dropna(how="all")  # e.g. propagated_* of a method that does not expand its selection
    if rows.empty:
        return None
    if set(MODELS) <= set(rows.columns):
        rows["gain"] = rows["student"] - rows["warmup"]
    return rows


@register_section("pseudo_quality", order=60)
def pseudo_quality(ctx: ReportContext) -> Section | None:
    rows = _overall(ctx)
    if rows is None:
        return None
    dump = ctx.open_zarr("dump")
    attrs = dict(dump.attrs) if dump is not None else {}
    selection = attrs.get("warmup_selection", "see the dump stage")
    blocks: list = [Text(
        f"Pseudo-labels of the unlabeled tiles, scored against their hidden ground truth: the trained method "
        f"(`{attrs.get('method', 'student')}`, iteration {attrs.get('iteration', '?')}) with its own selection "
        f"rule, and the supervised warmup model with selection `{selection}`. Coverage is the share of valid "
        "pixels selected; mining ratio = selected correct / all correct and effective ratio = selected correct "
        "/ all valid pixels (CorrMatch Sec. 4.4); region accuracy and consistency follow RegionMatch Fig. 1 "
        "on the connected components of each pseudo-label. The class mix gap is how far the classes of the "
        "selected pixels (what the unlabeled loss trains on) are from the ground truth's mix: half the sum "
        "of the per-class differences of shares (0: the same mix). For a method that expands its confident "
        "pixels (CorrMatch's region propagation), the rows on propagation give the share of valid pixels it "
        "adds and their accuracy. The coverage of a threshold at equal accuracy is the share of valid pixels "
        "that a plain confidence threshold on the same pseudo-labels keeps at the accuracy of the selection: "
        "a selection that keeps more than that finds pixels that confidence alone does not.")]
    percent = rows.drop(index="regions", errors="ignore") * 100
    blocks.append(Table(percent.rename(index=LABELS).rename_axis("metric (%)"), float_format="{:.1f}"))
    if "regions" in rows.index:
        counts = rows.loc[["regions"]].rename(index=LABELS).rename_axis("count")
        blocks.append(Table(counts, float_format="{:.0f}"))
    figure = _per_class_figure(ctx)
    if figure is not None:
        blocks.append(Image(figure, "Per class: accuracy of the selected pseudo-labels, coverage (classes by "
                                    "pseudo-label) and the class mix of the selected pixels against the ground "
                                    "truth's"))
    curve = _curve_figure(ctx, rows)
    if curve is not None:
        blocks.append(Image(curve, "Accuracy of the pseudo-labels with confidence >= t against their share of the "
                                   "valid pixels, as t sweeps from 0 to 1 (lines), and each model's own selection "
                                   "(dots): a dot above its line keeps more pixels at its accuracy than a "
                                   "confidence threshold would"))
    blocks += _examples(ctx)
    return Section("Pseudo-label quality", blocks)


def _curve_figure(ctx: ReportContext, rows: pd.DataFrame) -> str | None:
    curve = ctx.read_csv("pseudo_curve")
    if curve is None:
        return None
    fig = new_figure(4.8, 3.6)
    ax = fig.subplots()
    for i, (model, prefix) in enumerate((("warmup", "warmup_"), ("student", ""))):
        columns = (prefix + "coverage", prefix + "accuracy")
        if not set(columns) <= set(curve.columns):
            continue
        line = curve[list(columns)].dropna()
        color = model_color(model, i)
        ax.plot(100 * line[columns[0]], 100 * line[columns[1]], color=color, label=model)
        if model in rows.columns and {"coverage", "accuracy"} <= set(rows.index):
            ax.plot(100 * rows.loc["coverage", model], 100 * rows.loc["accuracy", model], "o", color=color,
                    markeredgecolor="black", label=f"{model}: own selection")
    ax.set_xlabel("coverage: share of valid pixels with confidence >= t (%)", fontsize="small")
    ax.set_ylabel("accuracy of those pixels (%)", fontsize="small")
    ax.set_xlim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize="small")
    return ctx.save_figure(fig, "pseudo_curve")


def _per_class_figure(ctx: ReportContext) -> str | None:
    table = ctx.read_parquet("pseudo")
    if table is None:
        return None
    per_class = table[table["class"] != "all"]
    classes = list(dict.fromkeys(per_class["class"]))
    models = [m for m in MODELS if m in set(per_class["model"])]
    if not classes or not models:
        return None

    def values(model: str, metric: str) -> np.ndarray:
        rows = per_class[(per_class["model"] == model) & (per_class["metric"] == metric)]
        return rows.set_index("class")["value"].reindex(classes).to_numpy(dtype=float)

    metrics = [m for m in ("accuracy", "coverage", "kept_share") if m in set(per_class["metric"])]
    if not metrics:
        return None
    fig = new_figure(max(4.0, 0.9 * len(classes) + 1.5), 2.2 * len(metrics))
    axes = np.atleast_1d(fig.subplots(len(metrics), 1, sharex=True))
    x = np.arange(len(classes))
    width = 0.8 / len(models)
    for ax, metric in zip(axes, metrics, strict=True):
        for i, model in enumerate(models):
            ax.bar(x + (i - (len(models) - 1) / 2) * width, 100 * values(model, metric), width,
                   label=model, color=model_color(model, i))
        ax.set_ylabel(f"{LABELS[metric]} (%)", fontsize="small")
        ax.set_ylim(0, 100)
    if metrics[-1] == "kept_share" and "class_bias" in set(per_class["metric"]):
        # the ground truth's mix is the same for every model: kept share minus its gap
        truth = values(models[0], "kept_share") - values(models[0], "class_bias")
        axes[-1].scatter(x, 100 * truth, marker="_", s=400, color="black", label="ground truth", zorder=3)
        highest = np.nanmax(np.concatenate([truth, *(values(m, "kept_share") for m in models)]))
        axes[-1].set_ylim(0, max(10.0, 110 * highest))
        axes[-1].legend(frameon=False, fontsize="small")
    axes[0].legend(frameon=False, fontsize="small", ncols=len(models))
    axes[-1].set_xticks(x, classes, rotation=30 if len(classes) > 6 else 0, fontsize="small")
    return ctx.save_figure(fig, "pseudo_per_class")


def _examples(ctx: ReportContext) -> list:
    """A few dumped tiles, evenly spread over the dump, rendered like `s4seg inspect --tile`."""
    dump_path, tiles_path = ctx.path("dump"), ctx.path("tiles")
    if dump_path is None or tiles_path is None:
        return []
    dump = ctx.open_zarr("dump")
    if "tile_id" not in dump:
        return []
    ids = np.asarray(dump["tile_id"][:])
    if not len(ids):
        return []
    picks = np.unique(np.linspace(0, len(ids) - 1, num=min(EXAMPLE_TILES, len(ids))).round().astype(int))
    blocks = []
    for row in picks:
        tile_id = int(ids[row])
        path = ctx.save_figure(tile_figure(dump_path, tiles_path, tile_id, panel_px=192), f"pseudo_tile_{tile_id}")
        blocks.append(Image(path, f"Unlabeled tile {tile_id}: image, ground truth, pseudo-label, selected pixels "
                                  "(dark grey: not selected), regions"))
    return blocks


@register_section("pseudo_snapshots", order=70)
def pseudo_snapshots(ctx: ReportContext) -> Section | None:
    path = ctx.path("snapshots")
    if path is None:
        return None
    curve = snapshot_quality(path)
    if curve.empty:
        return Section("Pseudo-labels during training", [Text(
            "No snapshots were taken (`train.snapshot_every` is 0); set it to a number of iterations to follow "
            "the pseudo-labels of a few unlabeled tiles during training.")])
    blocks: list = [Text(f"Pseudo-labels of {ctx.open_zarr('snapshots')['tile_ids'].shape[0]} fixed unlabeled "
                         f"tiles, taken every few iterations ({len(curve)} snapshots).")]
    fig = new_figure(6.0, 3.2)
    ax = fig.subplots()
    for column, style in (("accuracy", "-o"), ("accuracy_all", "--"), ("coverage", "-s")):
        ax.plot(curve["step"], 100 * curve[column], style, markersize=3, label=LABELS[column])
    ax.set_xlabel("iteration")
    ax.set_ylabel("%")
    ax.legend(frameon=False, fontsize="small")
    blocks.append(Image(ctx.save_figure(fig, "pseudo_snapshots_curve"),
                        "Coverage and accuracy of the pseudo-labels vs iteration"))
    blocks.append(Image(_strip(ctx), "One tile's pseudo-label over training (selected pixels in colour, the rest "
                                     "dark), and its ground truth"))
    curve_table = (curve.set_index("step")[["accuracy", "coverage", "effective_ratio", "class_bias"]] * 100)
    blocks.append(Table(curve_table.rename(columns=LABELS).rename_axis("iteration"), float_format="{:.1f}",
                        caption="In percent"))
    return Section("Pseudo-labels during training", blocks)


def _strip(ctx: ReportContext) -> str:
    group = ctx.open_zarr("snapshots")
    palette = list(group.attrs.get("palette", ctx.palette))
    classes = list(group.attrs.get("classes", ctx.classes))
    steps = np.asarray(group["steps"][:])
    shown = np.unique(np.linspace(0, len(steps) - 1, num=min(STRIP_SNAPSHOTS, len(steps))).round().astype(int))
    fig = new_figure(1.6 * (len(shown) + 1) + 1.4, 2.0)
    axes = fig.subplots(1, len(shown) + 1, squeeze=False)[0]
    for ax, s in zip(axes, shown, strict=False):
        rgb = colorize(np.asarray(group["pseudo"][s, 0]), palette)
        rgb[~np.asarray(group["keep"][s, 0])] = 64
        ax.imshow(rgb, interpolation="nearest")
        ax.set_title(f"it {int(steps[s])}", fontsize="small")
    axes[-1].imshow(colorize(np.asarray(group["gt"][0]), palette), interpolation="nearest")
    axes[-1].set_title("ground truth", fontsize="small")
    for ax in axes:
        ax.set_axis_off()
    fig.legend(handles=legend_handles(classes, palette), loc="outside right center", frameon=False,
               fontsize="x-small")
    return ctx.save_figure(fig, "pseudo_snapshots_strip")


def pseudo_section(inputs: ReportInputs, figures_dir: str | Path, config: ReportConfig | None = None,
                   figures_prefix: str = "figures") -> tuple[str, list[Path]]:
    """Both sections on their own: (Markdown, paths of the PNGs written to `figures_dir`)."""
    from s4seg.report.render import block_markdown

    ctx = ReportContext(inputs, config or ReportConfig(), Path(figures_dir), figures_prefix)
    parts = []
    for fn in (pseudo_quality, pseudo_snapshots):
        section = fn(ctx)
        if section is not None:
            parts.append(f"## {section.title}")
            parts += [block_markdown(b) for b in section.blocks]
    return "\n\n".join(parts) + "\n", [Path(figures_dir) / f"{name}.png" for name in ctx.figures]
