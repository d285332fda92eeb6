#!/usr/bin/env python
r"""
Runs a MaskFormer / Mask2Former model on images, a video or the webcam and draws its predictions.

    python demo/demo.py --config-file configs/shapes/maskformer_R18_shapes.yaml \
        --input datasets/shapes/val/images --output output/vis \
        --opts MODEL.WEIGHTS output/demo/train/model_final.pth

Each visualisation shows, side by side, a panel per output the config turns on (panoptic,
instances, semantic; ``MODEL.MASK_FORMER.TEST.*_ON``), with the class names and colours of
``DATASETS.TEST[0]``. Images are written as ``<output>/<input stem>.png`` (or to ``--output``
itself when it is a file name and there is one input); a video is written as one video file.
Inputs that cannot be read are reported and skipped; the exit code is then 1.
"""

import argparse
import glob
import logging
import os
import re
import sys
import time

import cv2
from detectron2.config import get_cfg
from detectron2.utils.logger import setup_logger
from PIL import Image
from predictor import VisualizationDemo, read_image_rgb
from tqdm import tqdm

from mask_former import add_mask_former_config
from mask_former.engine import tune_malloc, use_cpu_without_cuda

logger = logging.getLogger("mask_former.demo")

WINDOW_NAME = "mask_former"
ESC_KEY = 27
# Output image formats (by extension) and video containers with the codec written into them.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
VIDEO_CODECS = {".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".mkv": "mp4v", ".avi": "MJPG"}
DEFAULT_VIDEO_EXTENSION = ".mp4"
DEFAULT_FPS = 30.0
WEBCAM_INDEX = 0
EXIT_OK, EXIT_INPUT_FAILED = 0, 1


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.strip().split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.strip().split("\n\n", 1)[1],
    )
    parser.add_argument("--config-file", required=True, metavar="FILE")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--input", nargs="+", help="image files, directories (their images) or glob patterns"
    )
    source.add_argument("--video-input", metavar="FILE", help="a video file")
    source.add_argument("--webcam", action="store_true", help="camera 0 (stop with Esc/Ctrl-C)")
    parser.add_argument(
        "--output",
        help="folder for the visualisations, or a file name for a single image or a video; "
        "without it, results are shown in a window (needs a display)",
    )
    parser.add_argument(
        "--confidence-threshold",
        type=float,
        default=0.5,
        help="minimum score of the instances drawn",
    )
    parser.add_argument(
        "--batch-size", type=int, default=1, help="images or frames per forward pass"
    )
    parser.add_argument(
        "--opts", default=[], nargs=argparse.REMAINDER, help="config overrides KEY VALUE ..."
    )
    args = parser.parse_args(argv)
    if args.output:
        args.output = os.path.expanduser(args.output)
    if not os.path.isfile(args.config_file):
        parser.error(f"--config-file {args.config_file} does not exist")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    return parser, args


def setup_cfg(args):
    """The frozen config; CUDA devices fall back to the CPU (with a warning) when CUDA is
    missing, so that published configs run on CPU-only machines."""
    cfg = get_cfg()
    add_mask_former_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    use_cpu_without_cuda(cfg)
    if not cfg.MODEL.WEIGHTS:
        logger.warning("MODEL.WEIGHTS is empty: the model has random weights")
    cfg.freeze()
    return cfg


def display_available():
    """Whether OpenCV can open a window here: it has a GUI backend (opencv-python-headless has
    none) and, on Linux, an X11 or Wayland display is set."""
    match = re.search(r"GUI:\s*(\S+)", cv2.getBuildInformation())
    if match is None or match.group(1).upper() == "NONE":
        return False
    if sys.platform.startswith("linux"):
        return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    return True


def expand_inputs(patterns):
    """
    Files of ``--input``: files as given, directories' image files (by extension, sorted, not
    recursive) and glob matches (sorted, ``**`` recursive); a leading ``~`` is expanded (quoted
    patterns reach us unexpanded).

    Returns:
        tuple[list[str], list[str]]: the files, and the arguments that matched nothing.
    """
    paths, unmatched = [], []
    for argument in patterns:
        pattern = os.path.expanduser(argument)
        if os.path.isdir(pattern):
            found = [
                os.path.join(pattern, name)
                for name in sorted(os.listdir(pattern))
                if name.lower().endswith(IMAGE_EXTENSIONS)
                and os.path.isfile(os.path.join(pattern, name))
            ]
        elif os.path.exists(pattern):
            found = [pattern]
        else:
            found = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if found:
            paths.extend(found)
        else:
            unmatched.append(argument)
    return paths, unmatched


def output_paths(paths, output):
    """
    Where each input's visualisation goes: ``output`` itself for one input when it names a file
    (an image extension, not an existing folder), otherwise ``<output>/<stem>.png`` (a suffix
    ``_2``, ``_3``... keeps equal stems apart).
    """
    if len(paths) == 1 and _names_file(output, IMAGE_EXTENSIONS):
        return [output]
    if _names_file(output, IMAGE_EXTENSIONS):
        raise ValueError(
            f"--output {output} is a file name, but there are {len(paths)} inputs: give a folder"
        )
    names, seen = [], {}
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        seen[stem] = seen.get(stem, 0) + 1
        suffix = f"_{seen[stem]}" if seen[stem] > 1 else ""
        names.append(os.path.join(output, f"{stem}{suffix}.png"))
    return names


def _names_file(output, extensions):
    return not os.path.isdir(output) and os.path.splitext(output)[1].lower() in extensions


def _chunks(items, size):
    return [items[i : i + size] for i in range(0, len(items), size)]


def _describe(prediction, threshold):
    parts = []
    if "panoptic_seg" in prediction:
        parts.append(f"{len(prediction['panoptic_seg'][1])} panoptic segments")
    if "instances" in prediction:
        kept = int((prediction["instances"].scores > threshold).sum())
        parts.append(f"{kept} instances above {threshold}")
    if "sem_seg" in prediction:
        parts.append(f"{len(prediction['sem_seg'].argmax(0).unique())} semantic classes")
    return ", ".join(parts)


def _read_image_or_warn(path):
    """The RGB image of ``path``, or None (with a warning naming it) when it cannot be read."""
    try:
        return read_image_rgb(path)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        logger.warning("Skipping %s: not a readable image (%s: %s)", path, type(e).__name__, e)
        return None


def run_on_images(demo, paths, destinations, args):
    """
    Predicts, draws and saves (or, when ``destinations`` is None, shows) every image.

    Returns:
        tuple[int, list[str]]: the number of visualisations made and the unreadable paths.
    """
    done, failed = 0, []
    destinations = destinations or [None] * len(paths)
    progress = tqdm(total=len(paths), unit="image", disable=None)
    for chunk in _chunks(list(zip(paths, destinations)), args.batch_size):
        readable = []
        for path, destination in chunk:
            image = _read_image_or_warn(path)
            if image is None:
                failed.append(path)
            else:
                readable.append((path, destination, image))
        start = time.perf_counter()
        predictions = demo.predictor([image for _, _, image in readable]) if readable else []
        seconds = (time.perf_counter() - start) / max(len(readable), 1)
        for (path, destination, image), prediction in zip(readable, predictions):
            description = _describe(prediction, args.confidence_threshold)
            logger.info("%s: %s; predicted in %.2f s", path, description, seconds)
            vis = demo.draw(image, prediction)
            done += 1
            if destination is not None:
                Image.fromarray(vis).save(destination)
            elif _show(vis[:, :, ::-1], wait_ms=0):
                return done, failed
        progress.update(len(chunk))
    progress.close()
    return done, failed


def _show(bgr, wait_ms):
    """Shows an image; returns whether the user pressed Esc."""
    cv2.imshow(WINDOW_NAME, bgr)
    return cv2.waitKey(wait_ms) == ESC_KEY


def video_output_path(output, source_name):
    """``output`` if it names a video file, else ``<output>/<source stem>.mp4``."""
    if _names_file(output, tuple(VIDEO_CODECS)):
        return output
    if not os.path.isdir(output) and os.path.splitext(output)[1]:
        raise ValueError(
            f"--output {output}: unsupported video extension; use one of {sorted(VIDEO_CODECS)}"
        )
    os.makedirs(output, exist_ok=True)
    stem = os.path.splitext(os.path.basename(source_name))[0]
    return os.path.join(output, stem + DEFAULT_VIDEO_EXTENSION)


def run_on_stream(demo, capture, output, source_name):
    """Draws every frame of an opened capture into a video file (or a window when ``output``
    is None); returns the number of frames written or shown."""
    fps = capture.get(cv2.CAP_PROP_FPS) or DEFAULT_FPS
    total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))  # 0 or -1 for a camera
    writer, count = None, 0
    try:
        frames = demo.run_on_video(capture)
        for frame in tqdm(frames, total=total if total > 0 else None, unit="frame", disable=None):
            if output is None:
                if _show(frame, wait_ms=1):
                    break
            else:
                if writer is None:
                    writer = _open_writer(output, fps, frame.shape)
                writer.write(frame)
            count += 1
    except KeyboardInterrupt:
        logger.info("Interrupted after %d frames of %s", count, source_name)
    finally:
        capture.release()
        if writer is not None:
            writer.release()
    return count


def _open_writer(path, fps, shape):
    codec = VIDEO_CODECS[os.path.splitext(path)[1].lower()]
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*codec), fps, (shape[1], shape[0]))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write {path} with codec {codec}")
    return writer


def image_jobs(parser, args):
    """The image files, the arguments matching none and each image's destination (None:
    shown); reports bad ``--output`` values through ``parser.error``."""
    paths, unmatched = expand_inputs(args.input)
    for pattern in unmatched:
        logger.warning("Skipping %s: no such file, and no file matches it", pattern)
    if not args.output:
        return paths, unmatched, None
    try:
        destinations = output_paths(paths, args.output)
    except ValueError as e:
        parser.error(str(e))
    for folder in {os.path.dirname(d) for d in destinations}:
        os.makedirs(folder or ".", exist_ok=True)
    return paths, unmatched, destinations


def report_images(done, failed, output):
    """Logs the outcome of an image run; returns the exit code."""
    if output:
        logger.info("Wrote %d visualisation(s) to %s", done, output)
    if failed:
        logger.error("%d input(s) failed: %s", len(failed), ", ".join(failed))
        return EXIT_INPUT_FAILED
    return EXIT_OK


def main(argv=None):
    """Runs the demo; returns the exit code (1 when an input could not be read)."""
    parser, args = parse_args(argv)
    setup_logger(name="mask_former")
    setup_logger()
    tune_malloc()
    if args.output is None and not display_available():
        parser.error(
            "--output is required here: no display is available to show the results "
            "(no GUI support in OpenCV, or DISPLAY / WAYLAND_DISPLAY unset)"
        )
    if args.input:
        paths, unmatched, destinations = image_jobs(parser, args)
        if not paths:
            logger.error("No input image found in %s", " ".join(args.input))
            return EXIT_INPUT_FAILED
    else:
        source = args.video_input or f"webcam{WEBCAM_INDEX}"
        try:
            output = video_output_path(args.output, source) if args.output else None
        except ValueError as e:
            parser.error(str(e))
    demo = VisualizationDemo(
        setup_cfg(args), confidence_threshold=args.confidence_threshold, batch_size=args.batch_size
    )
    if args.input:
        done, failed = run_on_images(demo, paths, destinations, args)
        return report_images(done, unmatched + failed, args.output)
    capture = cv2.VideoCapture(args.video_input if args.video_input else WEBCAM_INDEX)
    if not capture.isOpened():
        logger.error("Cannot open %s", source)
        return EXIT_INPUT_FAILED
    count = run_on_stream(demo, capture, output, source)
    logger.info(
        "%d frame(s) of %s %s", count, source, f"written to {output}" if output else "shown"
    )
    return EXIT_OK if count else EXIT_INPUT_FAILED


if __name__ == "__main__":
    sys.exit(main())
