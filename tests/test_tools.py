"""tools/analyze_model.py (parameters, FLOPs, activations, structure of a tiny model),
tools/plot_metrics.py (curves from a detectron2 metrics.json) and tools/benchmark_model.py (what
it reports, not how fast), through their main(); tools/run_demo.py's choice of iterations."""

import json
import logging
import math

import numpy as np
import pytest
import torch
from conftest import REPO, load_script, tiny_cfg
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model
from fvcore.nn import FlopCountAnalysis
from PIL import Image

from mask_former import add_mask_former_config
from mask_former.engine import defaults as engine_defaults

DATASET = "tools_test_images"
STEM_CHANNELS = 16  # TINY_OVERRIDES' MODEL.RESNETS.STEM_OUT_CHANNELS
STEM_KERNEL = 7
SIZE_DIVISIBILITY = 32  # MODEL.MASK_FORMER.SIZE_DIVISIBILITY of the MaskFormer ADE20K config


def load_tool(name):
    return load_script(f"tools/{name}.py", name)


analyze_model = load_tool("analyze_model")
benchmark_model = load_tool("benchmark_model")
plot_metrics = load_tool("plot_metrics")
run_demo = load_tool("run_demo")


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    """A tiny MaskFormer config file, and a registered dataset of two images of odd sizes."""
    folder = tmp_path_factory.mktemp("tools")
    rng = np.random.default_rng(0)
    records = []
    for index, (height, width) in enumerate([(64, 90), (70, 64)]):
        path = folder / f"{index}.png"
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
        records.append({"file_name": str(path), "height": height, "width": width})
    if DATASET not in DatasetCatalog.list():
        DatasetCatalog.register(DATASET, lambda: records)
    cfg = tiny_cfg(DATASETS__TEST=(DATASET,), INPUT__MIN_SIZE_TEST=64, INPUT__MAX_SIZE_TEST=96)
    path = folder / "tiny.yaml"
    path.write_text(cfg.dump())
    return str(path), cfg


def test_parameters_and_structure(tiny_config, capsys):
    config_file, cfg = tiny_config
    results = analyze_model.main(
        ["--config-file", config_file, "--tasks", "parameter", "structure"]
    )
    expected = sum(p.numel() for p in build_model(cfg).parameters())
    assert results == {"parameters": expected}
    out = capsys.readouterr().out
    assert f"Total parameters: {expected} " in out
    assert "MaskFormer(" in out and "| sem_seg_head" in out


@pytest.mark.parametrize("train_iters,amp", [(0, False), (1, False), (1, True)])
def test_benchmark_model_reports(tiny_config, capsys, monkeypatch, train_iters, amp):
    config_file, cfg = tiny_config
    if amp:  # bfloat16 autocast on the CPU: the model's convolutions see it
        dtypes = []
        conv2d = torch.nn.functional.conv2d

        def recording_conv2d(*args, **kwargs):
            enabled = torch.is_autocast_enabled("cpu")
            dtypes.append(torch.get_autocast_dtype("cpu") if enabled else None)
            return conv2d(*args, **kwargs)

        monkeypatch.setattr(torch.nn.functional, "conv2d", recording_conv2d)
    benchmark_model.main(
        ["--config-file", config_file, "--size", "64x96", "--batch", "2", "--warmup", "0"]
        + ["--iters", "1", "--train-iters", str(train_iters), "--threads", "1"]
        + ["--amp"] * amp
    )
    if amp:  # the FLOP count's trace runs in float32
        assert None in dtypes and torch.bfloat16 in dtypes
    out = capsys.readouterr().out
    expected = sum(p.numel() for p in build_model(cfg).parameters())
    assert f"parameters: {expected / 1e6:.3f} M" in out
    assert "input: 2x3x64x96" in out and "FLOPs (fvcore, per batch): " in out
    assert "forward incl. post-processing: median " in out
    assert ("training step (batch 2): median " in out) == (train_iters > 0)


def test_flops_and_activations_of_dataset_images(tiny_config, capsys):
    config_file, _ = tiny_config
    results = analyze_model.main(
        [
            "--config-file", config_file,
            "--tasks", "flop", "activation",
            "--num-inputs", "2",
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    # Short sides of 64 already: not resized.
    assert f"2 image(s) from dataset {DATASET}; model input sizes (H, W): (64, 90), (70, 64)" in out
    assert len(results["flops"]) == 2 and len(results["activations"]) == 2
    assert all(f > 0 for f in results["flops"] + results["activations"])
    assert "#flops" in out and "#activations" in out and "| backbone" in out
    mean = sum(results["flops"]) / 2
    assert f"Total FLOPs per image: {mean / 1e6:.3f} M" in out


def test_flop_count_of_the_stem_convolution(tiny_config):
    """The stem's 7x7 stride-2 convolution on a padded 64x96 input, counted by hand."""
    _, cfg = tiny_config
    predictor = analyze_model.BatchPredictor(cfg, input_format="BGR")
    inputs = [predictor.to_model_input(np.zeros((64, 90, 3), np.uint8))]
    (analysis,) = analyze_model.analyze(FlopCountAnalysis, predictor.model, inputs)
    padded = (64, math.ceil(90 / SIZE_DIVISIBILITY) * SIZE_DIVISIBILITY)
    outputs = (padded[0] // 2) * (padded[1] // 2) * STEM_CHANNELS
    expected = outputs * 3 * STEM_KERNEL * STEM_KERNEL
    assert analysis.by_module_and_operator()["model.backbone.stem.conv1"]["conv"] == expected


def test_random_input_of_a_given_size(tiny_config, capsys):
    config_file, _ = tiny_config
    results = analyze_model.main(
        ["--config-file", config_file, "--tasks", "flop", "--random-input", "--input-size", "64x80"]
    )
    assert len(results["flops"]) == 1
    assert (
        "1 image(s) from random images; model input sizes (H, W): (64, 80)"
        in capsys.readouterr().out
    )


def test_unavailable_dataset_falls_back_to_random_images(tiny_config, capsys):
    config_file, _ = tiny_config
    analyze_model.main(
        [
            "--config-file",
            config_file,
            "--tasks",
            "activation",
            "--",
            "DATASETS.TEST",
            "('nowhere',)",
        ]
    )
    # Default random size: 4:3 with the short side INPUT.MIN_SIZE_TEST (64).
    assert "from random images; model input sizes (H, W): (64, 85)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--config-file", "missing.yaml"], "--config-file missing.yaml does not exist"),
        (["--tasks", "flop", "--input-size", "64"], "--input-size must look like"),
        (["--num-inputs", "0"], "--num-inputs must be >= 1"),
        (["--tasks", "speed"], "invalid choice: 'speed'"),
    ],
)
def test_analyze_model_command_line_errors(tiny_config, capsys, argv, message):
    if "--config-file" not in argv:
        argv = ["--config-file", tiny_config[0], *argv]
    with pytest.raises(SystemExit) as exit_info:
        analyze_model.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


# --- plot_metrics -------------------------------------------------------------------------------

LOSSES = ("loss_ce", "loss_mask", "loss_dice")


def training_line(iteration):
    losses = {k: 1.0 / (iteration + 1) + i for i, k in enumerate(LOSSES)}
    losses.update({f"{k}_0": v * 2 for k, v in losses.items()})
    return {
        "data_time": 0.01,
        "eta_seconds": 100.0,
        "iteration": iteration,
        "lr": 1e-4,
        "time": 0.5,
        "total_loss": sum(losses.values()),
        **losses,
    }


def eval_line(iteration, miou):
    return {
        "iteration": iteration,
        "sem_seg/mIoU": miou,
        "sem_seg/IoU-sky": 90.0,
        "panoptic_seg/PQ": miou / 2,
        "segm/AP": miou / 4,
        "bbox/APl": float("nan"),
    }


def write_metrics(folder, lines, unfinished=""):
    folder.mkdir(exist_ok=True)
    path = folder / "metrics.json"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines) + unfinished)
    return path


def run_lines():
    """Iterations 19..199 every 20, evaluations at 99 and 199, iteration 59 logged twice (a
    resumed run; the second value counts)."""
    lines = [training_line(i) for i in range(19, 200, 20)]
    lines.insert(3, dict(training_line(59), total_loss=42.0))
    lines.insert(6, eval_line(99, 30.0))
    lines.append(eval_line(199, 50.0))
    return lines


def test_read_metrics_merges_lines_by_iteration(tmp_path):
    series = plot_metrics.read_metrics(write_metrics(tmp_path / "run", run_lines()))
    assert series["sem_seg/mIoU"] == [(99, 30.0), (199, 50.0)]
    assert dict(series["total_loss"])[59] == 42.0
    assert [i for i, _ in series["total_loss"]] == list(range(19, 200, 20))
    assert "bbox/APl" not in series  # only NaN values


def test_plot_default_keys_from_a_run_folder(tmp_path):
    folder = tmp_path / "run"
    write_metrics(folder, run_lines())
    output, keys = plot_metrics.main(["--metrics-json", str(folder)])
    assert keys == [
        "total_loss",
        "loss_ce",
        "loss_dice",
        "loss_mask",
        "panoptic_seg/PQ",
        "segm/AP",
        "sem_seg/mIoU",
    ]
    assert output == str(folder / "metrics.png")
    with Image.open(output) as image:
        image.verify()
        assert image.format == "PNG"
        # 7 panels: 3 columns x 3 rows of 4 x 3 inches at matplotlib's default 100 dpi.
        assert image.size == (1200, 900)


def test_plot_chosen_keys_smoothed_to_a_file(tmp_path):
    path = write_metrics(tmp_path / "run", run_lines(), unfinished='{"iteration": 219, "tot')
    output = tmp_path / "curves.png"
    _, keys = plot_metrics.main(
        [
            "--metrics-json", str(path),
            "--keys", "loss_ce_0", "sem_seg/IoU-sky",
            "--smooth", "3",
            "--output", str(output),
        ]
    )  # fmt: skip
    assert keys == ["loss_ce_0", "sem_seg/IoU-sky"]
    with Image.open(output) as image:
        assert image.format == "PNG" and image.size == (800, 300)


def test_moving_average():
    assert plot_metrics.moving_average([1.0, 2.0, 3.0, 4.0], 2) == [1.0, 1.5, 2.5, 3.5]
    assert plot_metrics.moving_average([1.0, 2.0], 5) == [1.0, 1.5]


@pytest.mark.parametrize(
    "content, argv, message",
    [
        (None, [], "does not exist"),
        ('{"iteration": 1, "total_loss": 1.0}\nnot json\n{"iteration": 2}\n', [], ":2: not a"),
        ("", [], "holds no scalars with an 'iteration'"),
        ('{"iteration": 1, "lr": 0.1}\n', [], "no values for the default keys; it has: lr"),
        ('{"iteration": 1, "total_loss": 1.0}\n', ["--keys", "segm/AP"], "['segm/AP']"),
    ],
)
def test_plot_metrics_errors(tmp_path, content, argv, message):
    if content is not None:
        (tmp_path / "metrics.json").write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        plot_metrics.main(["--metrics-json", str(tmp_path), *argv])
    assert message in str(exit_info.value.code)
    assert not (tmp_path / "metrics.png").exists()


def test_demo_trains_the_float32_iterations_without_native_bf16(monkeypatch, caplog):
    cfg = get_cfg()
    add_mask_former_config(cfg)
    cfg.merge_from_file(str(REPO / run_demo.DEFAULT_CONFIG), allow_unsafe=False)
    assert cfg.SOLVER.AMP.CPU_BF16 and cfg.SOLVER.MAX_ITER > run_demo.FLOAT32_MAX_ITER
    monkeypatch.setattr(engine_defaults, "cpu_has_native_bf16", lambda: False)
    with caplog.at_level(logging.WARNING):
        assert run_demo.demo_max_iter(run_demo.parse_args([])) == run_demo.FLOAT32_MAX_ITER
    messages = [r.getMessage() for r in caplog.records]
    assert any("no native bfloat16" in m for m in messages)
    assert any("The demo trains in float32" in m for m in messages)
    # --max-iter and other configs keep their iterations.
    assert run_demo.demo_max_iter(run_demo.parse_args(["--max-iter", "5"])) == 5
    other = ["--config-file", str(REPO / "configs/shapes/maskformer2_R18_shapes.yaml")]
    assert run_demo.demo_max_iter(run_demo.parse_args(other)) is None
    monkeypatch.setattr(engine_defaults, "cpu_has_native_bf16", lambda: True)
    assert run_demo.demo_max_iter(run_demo.parse_args([])) is None
    # The default config, named by its absolute path, trained in float32 on request.
    default = ["--config-file", str(REPO / run_demo.DEFAULT_CONFIG)]
    assert run_demo.demo_max_iter(run_demo.parse_args(default)) is None
    float32 = run_demo.parse_args(default + ["SOLVER.AMP.CPU_BF16", "False"])
    assert run_demo.demo_max_iter(float32) == run_demo.FLOAT32_MAX_ITER
