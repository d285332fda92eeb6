#!/usr/bin/env python
"""
Plots the loss and metric curves of a training run from its ``metrics.json``.

    python tools/plot_metrics.py --metrics-json output/demo/train [--keys total_loss sem_seg/mIoU]
        [--output curves.png] [--smooth 5]

``metrics.json`` is what detectron2's ``JSONWriter`` writes: one JSON object per line, with
``iteration`` and the scalars logged since the previous line. Training losses appear on the
periodic lines; evaluation results (``sem_seg/mIoU``, ``panoptic_seg/PQ``, ``segm/AP``, ...)
only on the lines written after an evaluation. A resumed run writes some iterations again: the
last value of an iteration wins. Default keys: ``total_loss``, every ``loss_*`` of the last
decoder layer (not the ``loss_*_<i>`` of deep supervision) and every evaluation metric except
the per-class ones (``IoU-<class>``, ``AP-<class>``, ...). One panel per key; ``--smooth N``
overlays the moving average over N logged points on the training curves.
"""

import argparse
import json
import logging
import math
import os
import re

logger = logging.getLogger("mask_former.plot_metrics")

METRICS_FILE = "metrics.json"
DEFAULT_OUTPUT = "metrics.png"
AUX_LOSS = re.compile(r"_\d+$")
# An evaluation result is "<task>/<metric>"; a metric containing "-" is a per-class one.
EVAL_METRIC = re.compile(r"^[^/]+/[^-]+$")
PANEL_SIZE = (4.0, 3.0)  # inches
MAX_COLUMNS = 3


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.strip().split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.strip().split("\n\n", 1)[1],
    )
    parser.add_argument(
        "--metrics-json",
        required=True,
        metavar="PATH",
        help=f"a {METRICS_FILE} file or the run's output folder holding one",
    )
    parser.add_argument("--keys", nargs="+", help="scalars to plot (default: see below)")
    parser.add_argument(
        "--output", help=f"PNG to write (default: {DEFAULT_OUTPUT} beside {METRICS_FILE})"
    )
    parser.add_argument(
        "--smooth", type=int, default=1, help="moving-average window in logged points (1: off)"
    )
    args = parser.parse_args(argv)
    if args.smooth < 1:
        parser.error(f"--smooth must be >= 1, got {args.smooth}")
    return args


def read_metrics(path):
    """
    Reads a detectron2 ``metrics.json``.

    Args:
        path (str): the file.

    Returns:
        dict[str, list[tuple[int, float]]]: per scalar key, (iteration, value) sorted by
        iteration, one value per iteration (the last one written).

    Raises:
        ValueError: the file holds no line with an iteration, or a line that is not a JSON
            object (except an unfinished last line, which is skipped with a warning).
    """
    with open(path) as f:
        lines = [(number, line) for number, line in enumerate(f, 1) if line.strip()]
    series = {}
    for index, (number, line) in enumerate(lines):
        try:
            entry = json.loads(line)
            if not isinstance(entry, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if index == len(lines) - 1 and not line.endswith("\n"):
                logger.warning("%s:%d: skipping an unfinished last line", path, number)
                continue
            raise ValueError(f"{path}:{number}: not a metrics line of JSONWriter ({e})") from None
        if "iteration" not in entry:
            continue
        for key, value in entry.items():
            if key != "iteration" and isinstance(value, (int, float)) and math.isfinite(value):
                series.setdefault(key, {})[entry["iteration"]] = float(value)
    if not series:
        raise ValueError(f"{path} holds no scalars with an 'iteration'")
    return {key: sorted(points.items()) for key, points in series.items()}


def default_keys(keys):
    """``total_loss``, the last layer's ``loss_*`` and the summary evaluation metrics."""
    losses = sorted(k for k in keys if k.startswith("loss_") and not AUX_LOSS.search(k))
    metrics = sorted(k for k in keys if EVAL_METRIC.match(k))
    return [k for k in ("total_loss",) if k in keys] + losses + metrics


def moving_average(values, window):
    """Mean of the last ``window`` values at every point (fewer at the start)."""
    averages, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        averages.append(total / min(i + 1, window))
    return averages


def plot(series, keys, output, smooth):
    """Writes one panel per key (iteration on x) to ``output`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(MAX_COLUMNS, len(keys))
    rows = math.ceil(len(keys) / columns)
    fig, axes = plt.subplots(
        rows, columns, figsize=(PANEL_SIZE[0] * columns, PANEL_SIZE[1] * rows), squeeze=False
    )
    for ax, key in zip(axes.flat, keys):
        iterations, values = zip(*series[key])
        is_metric = EVAL_METRIC.match(key) is not None
        if is_metric or smooth == 1:
            ax.plot(iterations, values, marker="o" if is_metric else None, markersize=3)
        else:
            ax.plot(iterations, values, alpha=0.3, label="logged")
            ax.plot(iterations, moving_average(values, smooth), label=f"mean of {smooth}")
            ax.legend(fontsize="small")
        if key.startswith("loss_") or key == "total_loss":
            ax.set_yscale("log" if min(values) > 0 else "linear")
        ax.set_title(key)
        ax.set_xlabel("iteration")
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(output, format="png")
    plt.close(fig)


def main(argv=None):
    """Writes the plot; returns (output path, keys plotted). Errors exit with a message."""
    args = parse_args(argv)
    path = args.metrics_json
    if os.path.isdir(path):
        path = os.path.join(path, METRICS_FILE)
    if not os.path.isfile(path):
        raise SystemExit(f"plot_metrics: error: {path} does not exist")
    try:
        series = read_metrics(path)
    except ValueError as e:
        raise SystemExit(f"plot_metrics: error: {e}") from None
    keys = args.keys or default_keys(series)
    missing = [k for k in keys if k not in series]
    if missing or not keys:
        raise SystemExit(
            f"plot_metrics: error: {path} has no values for {missing or 'the default keys'}; "
            f"it has: {', '.join(sorted(series))}"
        )
    output = args.output or os.path.join(os.path.dirname(path), DEFAULT_OUTPUT)
    plot(series, keys, output, args.smooth)
    logger.info("Wrote %s (%s)", output, ", ".join(keys))
    return output, keys


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main()
