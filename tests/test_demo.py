"""demo/demo.py on a tiny random model: images of every mode (grayscale, RGBA, 16-bit, EXIF
rotation), unreadable inputs, output naming, a synthetic video, and the command-line errors."""

import logging
import sys

import cv2
import numpy as np
import pytest
from conftest import REPO, load_script, tiny_cfg
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from PIL import Image

from mask_former import add_mask_former_config
from mask_former.data.datasets.shapes import SHAPES_CATEGORIES

SHAPES_NAMES = [c["name"] for c in SHAPES_CATEGORIES]
NUM_PANELS = 3  # panoptic, instances, semantic
EXIF_ORIENTATION = 0x0112
ROTATE_90_CLOCKWISE = 6  # EXIF orientation value: the stored image is shown turned clockwise


@pytest.fixture(scope="module")
def demo():
    """demo/demo.py as a module (it imports demo/predictor.py from its own folder, as a script
    run from anywhere does)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(REPO / "demo"))
        return load_script("demo/demo.py", "demo_script")


@pytest.fixture(scope="module")
def vis(demo):
    """demo/predictor.py, as demo.py imported it."""
    return sys.modules["predictor"]


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    """A tiny MaskFormer with all three outputs and the shapes classes (random weights)."""
    cfg = tiny_cfg(
        DATASETS__TRAIN=("shapes_panoptic_train",),
        DATASETS__TEST=("shapes_panoptic_val",),
        MODEL__SEM_SEG_HEAD__NUM_CLASSES=len(SHAPES_CATEGORIES),
        INPUT__MIN_SIZE_TEST=64,
        INPUT__MAX_SIZE_TEST=96,
        MODEL__MASK_FORMER__TEST__PANOPTIC_ON=True,
        MODEL__MASK_FORMER__TEST__INSTANCE_ON=True,
        MODEL__MASK_FORMER__TEST__OBJECT_MASK_THRESHOLD=0.0,
    )
    path = tmp_path_factory.mktemp("config") / "tiny.yaml"
    path.write_text(cfg.dump())
    return str(path)


@pytest.fixture
def demo_log(caplog):
    """Records of the "mask_former" loggers (detectron2's setup_logger stops their propagation)."""
    logger = logging.getLogger("mask_former")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="mask_former")
    yield caplog
    logger.removeHandler(caplog.handler)


def rgb_image(height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def write_images(folder):
    """Images of several modes (72x96 unless rotated) and two unreadable files; returns the
    expected (height, width) of each readable one, by stem."""
    folder.mkdir()
    rgb = rgb_image(72, 96)
    gray = np.asarray(Image.fromarray(rgb).convert("L"))
    Image.fromarray(rgb).save(folder / "rgb.jpg")
    Image.fromarray(gray).save(folder / "gray.png")
    Image.fromarray(np.dstack([rgb, np.full((72, 96), 100, np.uint8)])).save(folder / "rgba.png")
    cv2.imwrite(str(folder / "gray16.png"), gray.astype(np.uint16) * 257)
    rotated = Image.fromarray(rgb)
    exif = rotated.getexif()
    exif[EXIF_ORIENTATION] = ROTATE_90_CLOCKWISE
    rotated.save(folder / "exif.png", exif=exif)
    (folder / "corrupt.jpg").write_bytes((folder / "rgb.jpg").read_bytes()[:200])
    (folder / "notes.txt").write_text("not an image")
    return {
        "rgb": (72, 96),
        "gray": (72, 96),
        "rgba": (72, 96),
        "gray16": (72, 96),
        "exif": (96, 72),
    }


def test_read_image_rgb_converts_every_mode(vis, tmp_path):
    reader = vis.read_image_rgb
    write_images(tmp_path / "images")
    rgb = reader(tmp_path / "images" / "rgb.jpg")
    gray = np.asarray(Image.open(tmp_path / "images" / "gray.png"))
    assert rgb.shape == (72, 96, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(reader(tmp_path / "images" / "gray.png"), np.dstack([gray] * 3))
    # 16-bit: scaled by 255/65535, not clipped at 255 (which would make it all white).
    np.testing.assert_array_equal(reader(tmp_path / "images" / "gray16.png"), np.dstack([gray] * 3))
    original = np.asarray(Image.open(tmp_path / "images" / "rgba.png"))
    np.testing.assert_array_equal(reader(tmp_path / "images" / "rgba.png"), original[:, :, :3])
    stored = np.asarray(Image.open(tmp_path / "images" / "exif.png"))
    np.testing.assert_array_equal(reader(tmp_path / "images" / "exif.png"), np.rot90(stored, k=-1))
    for name in ("corrupt.jpg", "notes.txt", "missing.png"):
        with pytest.raises(OSError):
            reader(tmp_path / "images" / name)


def test_images_are_drawn_and_unreadable_ones_reported(demo, vis, config_file, tmp_path, demo_log):
    expected = write_images(tmp_path / "images")
    output = tmp_path / "vis"
    code = demo.main(
        [
            "--config-file", config_file,
            "--input", str(tmp_path / "images"), str(tmp_path / "images" / "notes.txt"),
            str(tmp_path / "missing*.png"),
            "--output", str(output),
            "--batch-size", "2",
        ]
    )  # fmt: skip
    assert code == 1
    assert sorted(p.name for p in output.iterdir()) == sorted(f"{s}.png" for s in expected)
    for stem, (height, width) in expected.items():
        with Image.open(output / f"{stem}.png") as picture:
            assert picture.mode == "RGB"
            assert picture.size == (NUM_PANELS * width, height + vis.TITLE_HEIGHT)
    warnings = [r.getMessage() for r in demo_log.records if r.levelno == logging.WARNING]
    for bad in ("corrupt.jpg", "notes.txt", "missing*.png"):
        assert any(bad in message for message in warnings), bad
    errors = [r.getMessage() for r in demo_log.records if r.levelno == logging.ERROR]
    assert errors and errors[-1].startswith("3 input(s) failed")


def test_one_input_to_a_file_and_only_the_enabled_panels(demo, vis, config_file, tmp_path):
    Image.fromarray(rgb_image(64, 80)).save(tmp_path / "a.png")
    output = tmp_path / "out" / "a_vis.jpg"
    code = demo.main(
        [
            "--config-file", config_file,
            "--input", str(tmp_path / "a.png"),
            "--output", str(output),
            "--opts", "MODEL.MASK_FORMER.TEST.PANOPTIC_ON", "False",
            "MODEL.MASK_FORMER.TEST.INSTANCE_ON", "False",
        ]
    )  # fmt: skip
    assert code == 0
    with Image.open(output) as picture:
        assert picture.format == "JPEG"
        assert picture.size == (80, 64 + vis.TITLE_HEIGHT)  # the semantic panel only


def test_video_is_written_frame_by_frame(demo, vis, config_file, tmp_path):
    source = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(source), cv2.VideoWriter_fourcc(*"MJPG"), 5, (80, 64))
    assert writer.isOpened()
    for index in range(5):
        writer.write(rgb_image(64, 80, seed=index))
    writer.release()

    code = demo.main(
        [
            "--config-file", config_file,
            "--video-input", str(source),
            "--output", str(tmp_path / "out"),
            "--batch-size", "2",
        ]
    )  # fmt: skip
    assert code == 0
    capture = cv2.VideoCapture(str(tmp_path / "out" / "clip.mp4"))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    capture.release()
    assert len(frames) == 5
    assert frames[0].shape == (64 + vis.TITLE_HEIGHT, NUM_PANELS * 80, 3)


class _RepeatedFrames:
    """A ``cv2.VideoCapture`` stand-in returning the same BGR frame ``count`` times."""

    def __init__(self, frame, count):
        self.frame, self.count = frame, count

    def read(self):
        if self.count == 0:
            return False, None
        self.count -= 1
        return True, self.frame.copy()


def _two_objects(height, width, num_classes):
    """A prediction with two separate square instances (classes 0 and 1), panoptic segments and
    a semantic map."""
    import torch
    from detectron2.structures import Boxes, Instances

    masks = torch.zeros(2, height, width)
    masks[0, 5:25, 5:25] = 1
    masks[1, 30:60, 40:75] = 1
    instances = Instances((height, width))
    instances.pred_masks = masks
    instances.pred_boxes = Boxes(torch.tensor([[5.0, 5, 25, 25], [40, 30, 75, 60]]))
    instances.scores = torch.tensor([0.9, 0.8])
    instances.pred_classes = torch.tensor([0, 1])
    panoptic = (masks[0] + 2 * masks[1]).to(torch.int32)
    segments = [
        {"id": 1, "isthing": True, "category_id": 0},
        {"id": 2, "isthing": True, "category_id": 1},
    ]
    sem_seg = torch.zeros(num_classes, height, width)
    return {"instances": instances, "panoptic_seg": (panoptic, segments), "sem_seg": sem_seg}


def test_video_keeps_instance_colours_from_frame_to_frame(vis, config_file, monkeypatch):
    """Still images get random instance colours (as detectron2's Visualizer draws them); on a
    video the VideoVisualizer matches objects to the previous frames and keeps their colours."""
    cfg = get_cfg()
    add_mask_former_config(cfg)
    cfg.merge_from_file(config_file)
    demo = vis.VisualizationDemo(cfg, confidence_threshold=0.0)
    height, width = 64, 80
    prediction = _two_objects(height, width, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)
    monkeypatch.setattr(demo, "predictor", lambda images: [prediction for _ in images])
    frame = rgb_image(height, width, seed=7)
    things = slice(0, 2 * width)  # the panoptic and instance panels
    np.random.seed(0)
    drawn = [v[:, things] for v in demo.run_on_video(_RepeatedFrames(frame, 3))]
    assert len(drawn) == 3
    assert np.array_equal(drawn[0], drawn[1]) and np.array_equal(drawn[1], drawn[2])
    stills = [demo.run_on_images([frame[:, :, ::-1]])[0][1][:, things] for _ in range(2)]
    assert not np.array_equal(stills[0], stills[1])


def test_missing_video_fails(demo, config_file, tmp_path, demo_log):
    code = demo.main(
        [
            "--config-file", config_file,
            "--video-input", str(tmp_path / "none.avi"),
            "--output", str(tmp_path / "out.mp4"),
        ]
    )  # fmt: skip
    assert code == 1
    assert any("Cannot open" in r.getMessage() for r in demo_log.records)


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "--output is required here: no display"),
        (["--output", "vis.png"], "is a file name, but there are 2 inputs"),
        (["--output", "vis", "--batch-size", "0"], "--batch-size must be >= 1"),
    ],
)
def test_command_line_errors(demo, config_file, tmp_path, monkeypatch, capsys, extra, message):
    monkeypatch.setattr(demo, "display_available", lambda: False)
    monkeypatch.chdir(tmp_path)
    for name in ("a.png", "b.png"):
        Image.fromarray(rgb_image(32, 32)).save(tmp_path / name)
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--config-file", config_file, "--input", "a.png", "b.png", *extra])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_video_extension_is_a_command_line_error(demo, config_file, tmp_path, capsys):
    with pytest.raises(SystemExit):
        demo.main(["--config-file", config_file, "--video-input", "x.avi", "--output", "x.flv"])
    assert "unsupported video extension" in capsys.readouterr().err


@pytest.mark.parametrize(
    "gui, display, expected",
    [("NONE", ":0", False), ("GTK3", None, False), ("GTK3", ":0", True)],
)
def test_display_needs_gui_support_and_a_display(demo, monkeypatch, gui, display, expected):
    monkeypatch.setattr(demo.cv2, "getBuildInformation", lambda: f"  GUI:    {gui}\n")
    monkeypatch.setattr(demo.sys, "platform", "linux")
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    if display is None:
        monkeypatch.delenv("DISPLAY", raising=False)
    else:
        monkeypatch.setenv("DISPLAY", display)
    assert demo.display_available() is expected


def test_inputs_expand_folders_globs_and_keep_stems_apart(demo, tmp_path):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        Image.fromarray(rgb_image(8, 8)).save(tmp_path / sub / "x.png")
    (tmp_path / "a" / "y.JPG").write_bytes(b"")
    (tmp_path / "a" / "readme.md").write_text("")
    paths, unmatched = demo.expand_inputs(
        [str(tmp_path / "a"), str(tmp_path / "*" / "x.png"), str(tmp_path / "none*")]
    )
    assert paths == [
        str(tmp_path / "a" / "x.png"),
        str(tmp_path / "a" / "y.JPG"),
        str(tmp_path / "a" / "x.png"),
        str(tmp_path / "b" / "x.png"),
    ]
    assert unmatched == [str(tmp_path / "none*")]
    names = demo.output_paths(paths, "out")
    assert names == ["out/x.png", "out/y.png", "out/x_2.png", "out/x_3.png"]


def test_inputs_and_output_expand_the_home_folder(demo, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    Image.fromarray(rgb_image(8, 8)).save(tmp_path / "x.png")
    paths, unmatched = demo.expand_inputs(["~/*.png", "~/none*"])
    assert paths == [str(tmp_path / "x.png")] and unmatched == ["~/none*"]
    config = tmp_path / "c.yaml"
    config.write_text("")
    _, args = demo.parse_args(["--config-file", str(config), "--input", "a", "--output", "~/v"])
    assert args.output == str(tmp_path / "v")


@pytest.mark.parametrize("name", ["out.mp4", "out.mkv", "out.avi", "out.mov"])
def test_video_output_file_names(demo, tmp_path, name):
    assert demo.video_output_path(str(tmp_path / name), "clip.avi") == str(tmp_path / name)
    assert demo.video_output_path(str(tmp_path), "clip.avi") == str(tmp_path / "clip.mp4")


def test_metadata_of_the_test_dataset_or_generic_names(vis, config_file, demo_log):
    cfg = get_cfg()
    add_mask_former_config(cfg)
    cfg.merge_from_file(config_file)
    assert vis.visualization_metadata(cfg) is MetadataCatalog.get("shapes_panoptic_val")
    assert vis.visualization_metadata(cfg).stuff_classes == SHAPES_NAMES
    assert not demo_log.records

    cfg.DATASETS.TEST = ("demo_test_unregistered",)
    metadata = vis.visualization_metadata(cfg)
    assert metadata.stuff_classes == [f"class {i}" for i in range(len(SHAPES_NAMES))]
    assert len(metadata.thing_colors) == len(SHAPES_NAMES)
    assert "'demo_test_unregistered' lacks" in demo_log.records[-1].getMessage()


def test_ade20k_panoptic_things_are_drawn_by_their_contiguous_id(vis):
    """Mask2Former registers ade20k_panoptic_* with the 100 thing names only, while thing ids run
    up to 149: the demo draws things with the full class list (no IndexError, right names)."""
    import torch
    from detectron2.utils.visualizer import Visualizer

    registered = MetadataCatalog.get("ade20k_panoptic_val")
    assert len(registered.thing_classes) == 100
    metadata = vis.things_by_contiguous_id(registered)
    person = registered.stuff_classes.index("person")
    assert metadata.thing_classes[person] == "person" and len(metadata.thing_colors) == 150
    panoptic = torch.zeros(8, 8, dtype=torch.int32)
    panoptic[:4], panoptic[4:] = 1, 2
    segments = [
        {"id": 1, "isthing": True, "category_id": 149},  # the last thing id ("flag")
        {"id": 2, "isthing": True, "category_id": person},
    ]
    image = rgb_image(8, 8)
    with pytest.raises(IndexError):
        Visualizer(image, registered).draw_panoptic_seg(panoptic, segments)
    drawn = Visualizer(image, metadata).draw_panoptic_seg(panoptic, segments)
    assert drawn.get_image().shape == (8, 8, 3)
    coco = MetadataCatalog.get("coco_2017_val_panoptic")
    assert vis.things_by_contiguous_id(coco) is coco  # thing ids 0..79 index its 80 names
