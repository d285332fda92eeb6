"""
Visualisation of MaskFormer / Mask2Former predictions for ``demo/demo.py``: reading images of any
common mode, drawing the enabled outputs with detectron2's ``Visualizer``, and running on videos.

A visualisation is one RGB image with a titled panel per output that the config turns on
(``MODEL.MASK_FORMER.TEST.{PANOPTIC_ON,INSTANCE_ON,SEMANTIC_ON}``), side by side in the order
panoptic, instances, semantic. On videos, instances and thing segments are drawn with detectron2's
``VideoVisualizer``, which keeps an object's colour from frame to frame.
"""

import logging

import cv2
import numpy as np
from detectron2.data import MetadataCatalog
from detectron2.data.catalog import Metadata
from detectron2.utils.colormap import colormap
from detectron2.utils.video_visualizer import VideoVisualizer
from detectron2.utils.visualizer import ColorMode, Visualizer
from PIL import Image, ImageOps

from mask_former.engine.predictor import BatchPredictor

__all__ = ["VisualizationDemo", "read_image_rgb", "visualization_metadata"]

logger = logging.getLogger("mask_former.demo")

# Output key -> (switch in MODEL.MASK_FORMER.TEST, panel title), in drawing order.
TASKS = {
    "panoptic_seg": ("PANOPTIC_ON", "panoptic"),
    "instances": ("INSTANCE_ON", "instances"),
    "sem_seg": ("SEMANTIC_ON", "semantic"),
}
# Metadata a task's drawing reads: class names per contiguous id.
REQUIRED_METADATA = {
    "panoptic_seg": ("stuff_classes", "thing_classes"),
    "instances": ("thing_classes",),
    "sem_seg": ("stuff_classes",),
}
# PIL modes of 16-bit (and 32-bit integer) grayscale images, e.g. 16-bit PNGs.
WIDE_INTEGER_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")
UINT16_TO_UINT8 = 255.0 / 65535.0
TITLE_HEIGHT = 22
TITLE_FONT_SCALE = 0.5


def read_image_rgb(path):
    """
    Reads an image file as RGB, with its EXIF orientation applied.

    Grayscale, palette, CMYK and bilevel images are converted to RGB, RGBA and LA lose their
    alpha channel (as detectron2's ``read_image`` does), and 16-bit grayscale images are scaled by
    255 / 65535 (Pillow would clip them at 255 instead).

    Args:
        path (str): the file.

    Returns:
        np.ndarray: [H, W, 3] uint8 RGB.

    Raises:
        OSError: the file is missing or not an image Pillow can decode (also for truncated files).
    """
    with Image.open(path) as image:
        image.load()
        image = ImageOps.exif_transpose(image)
        if image.mode in WIDE_INTEGER_MODES:
            gray = np.asarray(image, dtype=np.float64) * UINT16_TO_UINT8
            gray = np.clip(np.round(gray), 0, 255).astype(np.uint8)
            return np.repeat(gray[:, :, None], 3, axis=2)
        return np.asarray(image.convert("RGB"))


def generic_metadata(num_classes):
    """Metadata naming classes "class 0" .. "class K-1", with detectron2's colour map."""
    names = [f"class {i}" for i in range(num_classes)]
    palette = colormap(rgb=True, maximum=255).astype(int).tolist()
    colors = [palette[i % len(palette)] for i in range(num_classes)]
    return Metadata(
        name="__generic__",
        stuff_classes=names,
        stuff_colors=colors,
        thing_classes=names,
        thing_colors=colors,
    )


def enabled_tasks(cfg):
    """Output keys the config turns on, in drawing order."""
    return [key for key, (switch, _) in TASKS.items() if cfg.MODEL.MASK_FORMER.TEST[switch]]


def visualization_metadata(cfg):
    """
    Class names and colours to draw with: the metadata of ``cfg.DATASETS.TEST[0]`` when it names
    every class the enabled outputs need (see :func:`things_by_contiguous_id`), otherwise
    :func:`generic_metadata` (with a warning).
    """
    num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    name = cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else None
    if name is None:
        logger.warning("cfg.DATASETS.TEST is empty: drawing generic class names")
        return generic_metadata(num_classes)
    metadata = MetadataCatalog.get(name)
    needed = {key for task in enabled_tasks(cfg) for key in REQUIRED_METADATA[task]}
    problems = [key for key in sorted(needed) if not metadata.get(key)]
    if "stuff_classes" in needed and "stuff_classes" not in problems:
        if len(metadata.stuff_classes) < num_classes:
            problems.append(f"stuff_classes has fewer than NUM_CLASSES={num_classes} names")
    if problems:
        logger.warning(
            "Metadata of %r lacks %s (is the dataset registered?): drawing generic class names",
            name,
            ", ".join(problems),
        )
        return generic_metadata(num_classes)
    return things_by_contiguous_id(metadata)


def things_by_contiguous_id(metadata):
    """Metadata whose ``thing_classes``/``thing_colors`` can be indexed by contiguous class id.

    detectron2's ``Visualizer`` looks thing names and colours up by the predicted (contiguous)
    class id. Where thing ids run past the thing lists, as for ``ade20k_panoptic_*`` (100
    ``thing_classes``, thing ids up to 149, as Mask2Former registers it), that would name things
    wrongly or fail with an IndexError; the full ``stuff_classes``/``stuff_colors`` lists are then
    used for things too (as MaskFormer registers that dataset).
    """
    mapping = metadata.get("thing_dataset_id_to_contiguous_id")
    things, names = metadata.get("thing_classes"), metadata.get("stuff_classes")
    if not mapping or not things or not names:
        return metadata
    largest = max(mapping.values())
    if largest < len(things) or largest >= len(names):
        return metadata
    fields = dict(metadata.as_dict(), thing_classes=list(names))
    if metadata.get("stuff_colors"):
        fields["thing_colors"] = list(metadata.stuff_colors)
    return Metadata(**fields)


class VisualizationDemo:
    """
    Predicts with :class:`BatchPredictor` and draws the results.

    Attributes:
        predictor (BatchPredictor): takes RGB images.
        metadata (Metadata): class names and colours used for drawing.
    """

    def __init__(self, cfg, *, confidence_threshold=0.5, batch_size=1):
        """
        Args:
            cfg (CfgNode): the model's config.
            confidence_threshold (float): instances of lower score are not drawn.
            batch_size (int): images (or video frames) per forward pass, at most; only images
                of equal padded size share one.
        """
        # Grouped by size: batching then leaves every result as it is one image at a time.
        self.predictor = BatchPredictor(
            cfg, input_format="RGB", batch_size=batch_size, group_by_size=True
        )
        self.metadata = visualization_metadata(cfg)
        self.confidence_threshold = confidence_threshold
        self.batch_size = batch_size

    def run_on_images(self, images):
        """
        Args:
            images (list[np.ndarray]): [H, W, 3] uint8 RGB images.

        Returns:
            list[tuple[dict, np.ndarray]]: per image, the model's result and the visualisation
            ([H + title, W * num_panels, 3] uint8 RGB).
        """
        predictions = self.predictor(list(images))
        return [(p, self.draw(image, p)) for image, p in zip(images, predictions)]

    def draw(self, image, prediction, video_visualizers=None):
        """One titled panel per output present in ``prediction``, side by side (RGB).

        Args:
            video_visualizers (dict or None): per output key, a ``VideoVisualizer`` that tracks
                the objects of consecutive frames (see :meth:`run_on_video`).
        """
        video_visualizers = video_visualizers or {}
        panels = [
            _with_title(
                self._draw_task(task, image, prediction[task], video_visualizers.get(task)), title
            )
            for task, (_, title) in TASKS.items()
            if task in prediction
        ]
        return np.concatenate(panels, axis=1)

    def _draw_task(self, task, image, output, video_visualizer=None):
        visualizer = Visualizer(image, self.metadata, instance_mode=ColorMode.IMAGE)
        if task == "panoptic_seg":
            panoptic_seg, segments_info = output
            if video_visualizer is not None:
                drawn = video_visualizer.draw_panoptic_seg_predictions(
                    image, panoptic_seg.cpu(), segments_info
                )
                return drawn.get_image()
            return visualizer.draw_panoptic_seg(panoptic_seg.cpu(), segments_info).get_image()
        if task == "instances":
            instances = output.to("cpu")
            instances = instances[instances.scores > self.confidence_threshold]
            if video_visualizer is not None:
                return video_visualizer.draw_instance_predictions(image, instances).get_image()
            return visualizer.draw_instance_predictions(instances).get_image()
        return visualizer.draw_sem_seg(output.argmax(dim=0).cpu()).get_image()

    def run_on_video(self, capture):
        """
        Predicts and draws every frame of an opened ``cv2.VideoCapture``, ``batch_size`` frames
        per forward pass (frames share their size, so batching does not change the results).

        Instances and thing segments keep their colours from frame to frame (detectron2's
        ``VideoVisualizer`` matches them to the previous frames' objects).

        Yields:
            np.ndarray: the visualisation of each frame, BGR (for ``cv2.VideoWriter``).
        """
        trackers = {
            task: VideoVisualizer(self.metadata, ColorMode.IMAGE)
            for task in ("panoptic_seg", "instances")
        }
        while True:
            frames = _read_frames(capture, self.batch_size)
            if not frames:
                return
            images = [np.ascontiguousarray(frame[:, :, ::-1]) for frame in frames]
            for image, prediction in zip(images, self.predictor(images)):
                vis = self.draw(image, prediction, trackers)
                yield np.ascontiguousarray(vis[:, :, ::-1])


def _read_frames(capture, count):
    """Up to ``count`` BGR frames; fewer at the end of the stream."""
    frames = []
    while len(frames) < count:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    return frames


def _with_title(panel, title):
    """Puts a white strip with ``title`` above an RGB panel."""
    strip = np.full((TITLE_HEIGHT, panel.shape[1], 3), 255, dtype=np.uint8)
    cv2.putText(
        strip,
        title,
        (4, TITLE_HEIGHT - 7),
        cv2.FONT_HERSHEY_SIMPLEX,
        TITLE_FONT_SCALE,
        (0, 0, 0),
        1,
        cv2.LINE_AA,
    )
    return np.concatenate([strip, panel], axis=0)
