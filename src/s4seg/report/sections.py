"""The built-in report sections: overview, metrics, per-class IoU, training curves, predictions, params.

Each reads its artifacts through the `ReportContext` and returns None when they are missing.
Metrics are shown in percent (the tables on disk hold fractions).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import yaml

from s4seg.report.base import (
    Bullets,
    Code,
    Image,
    ReportContext,
    Section,
    Table,
    Text,
    finite,
    register_section,
)
from s4seg.report.baseline import Baseline, last_step, protocol_differences, read_baseline
from s4seg.report.figures import colorize, display_image, legend_handles, model_color, new_figure

HEADLINE = (("miou", "mIoU"), ("mf1", "mF1"), ("oa", "OA"))
SCOPES = (("dataset", "", "test tiles"), ("scene", "", "whole test scenes"))  # (scope, scene, label)
BASE, NEW = "warmup", "student"


# --------------------------------------------------------------------------------------------------
# Reading eval.parquet / summary.json
# --------------------------------------------------------------------------------------------------
def models_of(table: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(table["model"]))


def headline_values(ctx: ReportContext) -> dict[tuple[str, str], dict[str, float]]:
    """{(scope label, metric): {model: value}} from eval.parquet, else from summary.json."""
    out: dict[tuple[str, str], dict[str, float]] = {}
    table = ctx.read_parquet("table")
    if table is not None:
        means = table[table["class"] == "all"]
        for scope, scene, label in SCOPES:
            rows = means[(means["scope"] == scope) & (means["scene"] == scene)]
            for metric, _ in HEADLINE:
                values = rows[rows["metric"] == metric].set_index("model")["value"]
                if len(values):
                    out[(label, metric)] = values.to_dict()
        return out
    summary = ctx.read_json("summary") or {}
    for key, value in summary.items():
        model, _, metric = key.partition(".")
        if model == "gain" or value is None:
            continue
        label = "whole test scenes" if metric.startswith("scene_") else "test tiles"
        out.setdefault((label, metric.removeprefix("scene_")), {})[model] = value
    return out


def precision_line(ctx: ReportContext) -> str | None:
    """How the models were trained and evaluated (the `precision` attribute evaluate writes to predictions.zarr)."""
    group = ctx.open_zarr("predictions")
    info = group.attrs.get("precision") if group is not None else None
    if not info:
        return None
    trained = ", ".join(f"`{model}` {p or 'unrecorded'}" for model, p in (info.get("trained") or {}).items())
    return (f"precision: trained in {trained or '?'}; evaluated in {info.get('evaluate', '?')}; "
            "weights and images channels_last (s4seg.runtime)")


def with_gain(frame: pd.DataFrame) -> pd.DataFrame:
    """Add a `gain` column (student - warmup) when both models are columns."""
    if BASE in frame.columns and NEW in frame.columns:
        frame = frame.assign(gain=frame[NEW] - frame[BASE])
    return frame


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------
def baseline_of(ctx: ReportContext) -> Baseline | None:
    """The baseline of `report.baseline` (s4seg.report.baseline), or None when none is given."""
    if ctx.inputs.baseline is None:  # none asked for: not a missing input
        return None
    return ctx._cached("baseline", read_baseline)


def _points(diff: float) -> str:
    return f"{abs(diff):.2f} point{'s' if round(abs(diff), 2) != 1 else ''}"


def headline(ctx: ReportContext, method: str, init: str) -> list[str]:
    """The test-tile mIoU of the trained model against the warmup and the baseline, with plain verdicts."""
    values = headline_values(ctx).get(("test tiles", "miou"), {})
    if not finite(values.get(NEW)):
        return []
    new, base = 100 * values[NEW], (100 * values[BASE] if finite(values.get(BASE)) else None)
    baseline = baseline_of(ctx)
    other = 100 * baseline.value("miou") if baseline is not None and finite(baseline.value("miou")) else None
    steps = last_step(ctx.path("train_log"))
    against = []
    if base is not None:
        against.append(f"{base:.2f} for the supervised warmup (**{new - base:+.2f}**)")
    if other is not None:
        against.append(f"{other:.2f} for `{baseline.method}` (**{new - other:+.2f}**, `{baseline.path}`)")
    items = [f"test-tile mIoU: **{new:.2f}** with `{method}`" + (" against " + "; ".join(against) if against else "")]

    if base is not None:
        warmup = "its warmup (the model it started from)" if init == "warmup" else \
            "the warmup (the labeled-only reference; this run did not start from it)"
        if round(new - base, 2) < 0:
            items.append(f"**Below {warmup}**: `{method}` scores {_points(new - base)} less test-tile mIoU"
                         + (": training on the unlabeled tiles undid part of what the warmup had learned at this "
                            "budget." if init == "warmup" and method != "supervised" else "."))
        else:
            items.append(f"Above {warmup} by {_points(new - base)}.")

    if other is not None:
        differences = protocol_differences(baseline, ctx.params, steps)
        if differences:
            shown = "; ".join(differences[:6]) + (f"; and {len(differences) - 6} more" if len(differences) > 6 else "")
            at = f"(**not at equal settings**: baseline vs this run, {shown})"
        else:
            at = "at equal iterations" + (f" ({steps} steps)" if steps is not None else "") + \
                " on the same data, split, seed, model and schedule"
        if round(new - other, 2) < 0:
            cost = ": at this budget the unlabeled data cost more than it bought." \
                if baseline.method == "supervised" and method != "supervised" and not differences else "."
            items.append(f"**Below `{baseline.method}`**: `{method}` scores {_points(new - other)} less test-tile "
                         f"mIoU than `{baseline.method}` {at}{cost}")
        else:
            items.append(f"Above `{baseline.method}` by {_points(new - other)} {at}.")
    elif method != "supervised":
        items.append("No `supervised` run to compare with at equal iterations (`report.baseline` is null): the "
                     "difference from the warmup mixes what the unlabeled tiles bought with what the iterations of "
                     "`train` bought. Run `-S method=supervised` with otherwise equal params, save it with "
                     "`s4seg baseline`, and set `report.baseline` (see s4seg.report.baseline).")
    return items


@register_section("overview", order=10)
def overview(ctx: ReportContext) -> Section:
    p = ctx.params
    method = p.get("method", "?")
    model = p.get("model") or {}
    dataset = p.get("dataset") or {}
    init = (p.get("train") or {}).get("init") or "warmup"
    start = "from the supervised `warmup` model (`train.init: warmup`)" if init == "warmup" else \
        ("from the pretrained encoder (`model.weights`) and an untrained decoder for the whole schedule "
         "(`train.init: pretrained`, the papers' protocol); the `warmup` model is shown as the labeled-only reference")
    items = [
        f"method: `{method}`, trained {start}",
        f"model: `{model.get('arch', '?')}` with encoder `{model.get('encoder', '?')}`",
        f"dataset: `{dataset.get('name', '?')}`, {len(ctx.classes)} classes ({', '.join(ctx.classes)})",
        *headline(ctx, method, init),
    ]
    precision = precision_line(ctx)
    if precision is not None:
        items.append(precision)
    return Section("Overview", [Bullets(tuple(items))])


@register_section("metrics", order=20)
def metrics(ctx: ReportContext) -> Section | None:
    values = headline_values(ctx)
    if not values:
        return None
    names = dict(HEADLINE)
    rows = {(label, names[metric]): {m: 100 * v if finite(v) else np.nan for m, v in by_model.items()}
            for (label, metric), by_model in values.items() if metric in names}
    frame = pd.DataFrame.from_dict(rows, orient="index")
    baseline = baseline_of(ctx)
    baseline_note = ""
    if baseline is not None:
        keys = {(label, names[metric]): metric for label, metric in values if metric in names}
        scoped = [baseline.value(keys[(label, name)] if label == "test tiles" else f"scene_{keys[(label, name)]}")
                  for label, name in frame.index]
        column = f"{baseline.method} (baseline)"
        frame[column] = [100 * v if finite(v) else np.nan for v in scoped]
        baseline_note = f" `{column}`: the trained model of `{baseline.path}` (see the overview)."
    frame.index = [f"{name} ({label})" for label, name in frame.index]
    blocks: list = [
        Text("Confusion matrices accumulated over the whole test set (pixels labelled 255 ignored); mIoU and "
             "mF1 average the classes that occur in the ground truth or the prediction. `test tiles`: every "
             "test tile on its own; `whole test scenes`: each test scene predicted by overlapping sliding "
             "windows (averaged softmax). In percent; `gain`: student - warmup." + baseline_note),
        Table(with_gain(frame)),
    ]
    table = ctx.read_parquet("table")
    if table is not None:
        per_class = table[(table["scope"] == "dataset") & (table["class"] != "all")]
        iou = per_class[per_class["metric"] == "iou"].pivot(index="class", columns="model", values="value") * 100
        if len(iou):
            iou = iou.reindex([c for c in ctx.classes if c in iou.index] or list(iou.index))[models_of(table)]
            pixels = per_class[per_class["metric"] == "pixels"].groupby("class")["value"].first()
            share = 100 * pixels / max(pixels.sum(), 1)
            frame = with_gain(iou).assign(**{"GT pixels %": share.reindex(iou.index)})
            blocks += [Text("Per-class IoU on the test tiles (n/a: the class occurs in neither the ground truth "
                            "nor the prediction)."), Table(frame)]
        scenes = table[(table["scope"] == "scene") & (table["scene"] != "") & (table["class"] == "all")
                       & (table["metric"] == "miou")]
        if len(scenes):
            by_scene = scenes.pivot(index="scene", columns="model", values="value")[models_of(scenes)] * 100
            blocks += [Text("mIoU per whole test scene (sliding window)."), Table(with_gain(by_scene))]
    return Section("Test metrics", blocks)


@register_section("per_class_iou", order=30)
def per_class_iou(ctx: ReportContext) -> Section | None:
    table = ctx.read_parquet("table")
    if table is None:
        return None
    iou = table[(table["class"] != "all") & (table["metric"] == "iou") & (table["scene"] == "")]
    panels = [(scope, label) for scope, _, label in SCOPES if (iou["scope"] == scope).any()]
    if not panels:
        return None
    models = models_of(table)
    classes = [c for c in ctx.classes if c in set(iou["class"])] or list(dict.fromkeys(iou["class"]))
    fig = new_figure(max(5.0, 0.9 * len(classes) * len(panels) + 2), 3.6)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    width = 0.8 / len(models)
    for ax, (scope, label) in zip(axes, panels, strict=True):
        values = iou[iou["scope"] == scope].pivot(index="class", columns="model", values="value").reindex(classes)
        x = np.arange(len(classes))
        for j, model in enumerate(models):
            heights = 100 * values[model].to_numpy() if model in values else np.full(len(classes), np.nan)
            ax.bar(x + (j - (len(models) - 1) / 2) * width, np.nan_to_num(heights), width, label=model,
                   color=model_color(model, j))
        ax.set_xticks(x, classes, rotation=30, ha="right")
        ax.set_ylim(0, 100)
        ax.set_ylabel("IoU (%)")
        ax.set_title(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(frameon=False)
    path = ctx.save_figure(fig, "per_class_iou")
    return Section("Per-class IoU", [Image(path, "IoU per class, the supervised warmup model next to the trained "
                                               "method (a missing bar: the class occurs nowhere)")])


def _column_groups(columns: list[str]) -> dict[str, list[str]]:
    """Log columns by panel: losses, learning rates, pseudo-label statistics (by name), test mIoU."""
    groups: dict[str, list[str]] = {"loss": [], "learning rate": [], "pseudo-labels": [], "test mIoU": []}
    pseudo_words = ("acc", "keep", "kept", "mask", "coverage", "conf", "ratio", "thresh", "tau", "pseudo")
    for c in columns:
        low = c.lower()
        if low.startswith("test_"):  # train.eval_every: a point every few rows
            groups["test mIoU"].append(c)
        elif low.startswith("loss"):
            groups["loss"].append(c)
        elif low.startswith("lr"):
            groups["learning rate"].append(c)
        elif any(w in low for w in pseudo_words):
            groups["pseudo-labels"].append(c)
    return {k: v for k, v in groups.items() if v}


@register_section("curves", order=40)
def curves(ctx: ReportContext) -> Section | None:
    blocks: list = []
    method = ctx.params.get("method", "train")
    for name, title in (("warmup_log", "warmup (supervised)"), ("train_log", f"train ({method})")):
        log = ctx.read_csv(name)
        if log is None:
            given = getattr(ctx.inputs, name)
            if given is not None:
                state = "is empty" if ctx.path(name) is not None else "is missing"
                blocks.append(Text(f"No curve for {title}: `{given}` {state} (re-run the stage that writes it)."))
            continue
        x = log["step"] if "step" in log.columns else pd.Series(np.arange(len(log)), name="row")
        numeric = [c for c in log.columns if c != x.name and pd.api.types.is_numeric_dtype(log[c])]
        groups = _column_groups(numeric)
        if not groups:
            continue
        fig = new_figure(4.2 * len(groups), 3.2)
        axes = fig.subplots(1, len(groups), squeeze=False)[0]
        for ax, (panel, columns) in zip(axes, groups.items(), strict=True):
            for column in columns:
                points = log[column].notna()  # sparse columns (test_miou) are empty between their points
                ax.plot(x[points], log[column][points], label=column, linewidth=1.2,
                        marker="o" if panel == "test mIoU" else None, markersize=3)
            ax.set_title(panel)
            ax.set_xlabel(str(x.name))
            ax.grid(alpha=0.3)
            ax.legend(frameon=False, fontsize="small")
            values = log[columns].to_numpy(dtype=float)
            values = values[np.isfinite(values)]
            if panel == "loss" and values.size and values.min() > 0 and values.max() / values.min() > 20:
                ax.set_yscale("log")  # losses spanning decades; a narrow range reads better on a linear axis
        fig.suptitle(title)
        blocks.append(Image(ctx.save_figure(fig, f"curves_{name.removesuffix('_log')}"), f"Training curves: {title}"))
    return Section("Training curves", blocks) if blocks else None


def pick_tiles(ids: np.ndarray, count: int) -> np.ndarray:
    """`count` positions spread evenly over the test tiles: representative, not cherry-picked."""
    if count <= 0 or len(ids) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.unique(np.linspace(0, len(ids) - 1, num=min(count, len(ids))).round().astype(np.int64))


@register_section("predictions", order=50)
def predictions(ctx: ReportContext) -> Section | None:
    preds, tiles = ctx.open_zarr("predictions"), ctx.open_zarr("tiles")
    if preds is None or tiles is None:
        return None
    ids = np.asarray(preds["ids"][:])
    models = [m for m in preds.attrs.get("models", []) if m in preds]
    rows = pick_tiles(ids, ctx.config.num_tiles)
    if not len(rows) or not models:
        return None
    table = ctx.read_parquet("table")
    tile_miou = {}
    if table is not None:
        t = table[(table["scope"] == "tile") & (table["metric"] == "miou")]
        tile_miou = {(r.model, int(r.tile)): r.value for r in t.itertuples()}
    palette = ctx.palette
    columns = ["image", "ground truth", *models]
    fig = new_figure(2.2 * len(columns) + 1.6, 2.2 * len(rows))
    axes = fig.subplots(len(rows), len(columns), squeeze=False)
    for r, row in enumerate(rows):
        tile_id = int(ids[row])
        panels = [display_image(tiles["images"][tile_id]), colorize(tiles["masks"][tile_id], palette)]
        panels += [colorize(preds[m][row], palette) for m in models]
        for c, (ax, panel) in enumerate(zip(axes[r], panels, strict=True)):
            ax.imshow(panel, interpolation="nearest", cmap="gray" if panel.ndim == 2 else None)
            ax.set_xticks([])
            ax.set_yticks([])
            title = columns[c]
            if c >= 2 and finite(tile_miou.get((models[c - 2], tile_id))):
                title += f" ({100 * tile_miou[(models[c - 2], tile_id)]:.0f})"
            if r == 0 or c >= 2:
                ax.set_title(title, fontsize="small")
        axes[r][0].set_ylabel(f"tile {tile_id}", fontsize="small")
    fig.legend(handles=legend_handles(ctx.classes, palette), loc="outside right center", frameon=False,
               fontsize="small")
    path = ctx.save_figure(fig, "predictions")
    return Section("Test tiles", [Image(path, "Test tiles spread evenly over the test set: image, ground truth "
                                              "and each model's prediction (its tile mIoU in brackets)")])


@register_section("params", order=90)
def params(ctx: ReportContext) -> Section | None:
    if not ctx.params:
        return None
    shown = dict(ctx.params)
    method = shown.get("method")
    if isinstance(shown.get("methods"), dict) and method in shown["methods"]:
        shown["methods"] = {method: shown["methods"][method]}  # only the section the run used
    text = yaml.safe_dump(shown, sort_keys=False, default_flow_style=False).strip()
    return Section("Parameters", [Text("`params.yaml` as used by this run (other methods' sections omitted)."),
                                  Code(text, "yaml")])
