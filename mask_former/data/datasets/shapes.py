"""The synthetic "shapes" dataset: small, deterministic, in detectron2's standard formats.

Each image shows several "thing" instances (circle, square, triangle, star, ring), touching and
occluding each other, on two or three textured "stuff" regions (sky, ground, water). Colours are
drawn from one distribution for every thing class (and one for every stuff class), so a model has
to use shape and texture, not colour. Some images hold a small unlabeled clutter patch (void).

The data is generated on first use, not at import, under ``$DETECTRON2_DATASETS/shapes``::

    shapes/
      {train,val}/
        images/000001.jpg      RGB image (JPEG)
        sem_seg/000001.png     uint8 contiguous class ids, 255 = void
        panoptic/000001.png    segment ids encoded as RGB (id = R + 256 G + 256^2 B), 0 = void
        instances.json         COCO instances of the things (RLE masks)
        panoptic.json          COCO panoptic segments of things and stuff
        _complete.json         completion marker (generator version, seed, count), written last

Contiguous class ids (the same in every format and dataset): things 0..4, then stuff 5..7.
COCO category ids are the contiguous ids plus one. Registered names:
``shapes_{sem_seg,instance,panoptic}_{train,val}``.
"""

import functools
import json
import logging
import os
import shutil

import cv2
import numpy as np
import pycocotools.mask as mask_util
from detectron2.data.datasets import load_coco_json, load_sem_seg
from detectron2.data.datasets.coco_panoptic import load_coco_panoptic_json
from panopticapi.utils import id2rgb

from .registration import datasets_root, register_dataset

logger = logging.getLogger(__name__)

__all__ = [
    "SHAPES_CATEGORIES",
    "default_shapes_root",
    "generate_shapes_sample",
    "image_rng",
    "num_images_from_env",
    "prepare_shapes_dataset",
    "register_all_shapes",
    "shapes_class_metadata",
]

# Bump whenever the generated files change, so that stale datasets on disk are regenerated.
GENERATOR_VERSION = 1
DEFAULT_SEED = 0
DEFAULT_NUM_IMAGES = {"train": 1000, "val": 100}
NUM_IMAGES_ENV = {"train": "MASK_FORMER_SHAPES_NUM_TRAIN", "val": "MASK_FORMER_SHAPES_NUM_VAL"}
SPLITS = ("train", "val")
IGNORE_LABEL = 255
LABEL_DIVISOR = 1000
MARKER_FILE = "_complete.json"

SHAPES_CATEGORIES = [
    {"id": 1, "name": "circle", "isthing": 1, "color": [220, 20, 60]},
    {"id": 2, "name": "square", "isthing": 1, "color": [0, 130, 200]},
    {"id": 3, "name": "triangle", "isthing": 1, "color": [60, 180, 75]},
    {"id": 4, "name": "star", "isthing": 1, "color": [255, 190, 25]},
    {"id": 5, "name": "ring", "isthing": 1, "color": [145, 30, 180]},
    {"id": 6, "name": "sky", "isthing": 0, "color": [135, 206, 235]},
    {"id": 7, "name": "ground", "isthing": 0, "color": [140, 100, 60]},
    {"id": 8, "name": "water", "isthing": 0, "color": [30, 60, 140]},
]
THING_NAMES = [c["name"] for c in SHAPES_CATEGORIES if c["isthing"]]
NUM_THINGS = len(THING_NAMES)
THING_IDS = frozenset(c["id"] for c in SHAPES_CATEGORIES if c["isthing"])
SKY, GROUND, WATER = 5, 6, 7

IMAGE_SIZE_RANGE = (128, 256)
OBJECT_SIZE_RANGE = (18, 60)  # diameter of the shape's circumscribed circle, in pixels
MIN_THINGS = 2
MAX_THINGS = 8
PIXELS_PER_EXTRA_THING = 5000
TOUCH_PROBABILITY = 0.4
MIN_VISIBLE_AREA = 60
MIN_VISIBLE_FRACTION = 0.25
VOID_PROBABILITY = 0.3
VOID_SIZE_RANGE = (8, 25)
THING_SATURATION, THING_VALUE = (90, 256), (90, 256)
STUFF_SATURATION, STUFF_VALUE = (30, 160), (90, 210)
OUTLINE_DARKENING = 0.6
JPEG_QUALITY = 95
LOG_EVERY = 250
_SPLIT_CODES = {"train": 0, "val": 1}
# Vertex radii (relative to the circumscribed radius) of the polygonal shapes.
_POLYGON_RADII = {"square": (1.0,) * 4, "triangle": (1.0,) * 3, "star": (1.0, 0.45) * 5}


def image_rng(seed, split, index):
    """Returns the random generator of one image: each image depends only on (seed, split, index).

    Args:
        seed (int): dataset seed.
        split (str): "train" or "val".
        index (int): index of the image in its split.
    """
    if split not in _SPLIT_CODES:
        raise ValueError(f"Unknown shapes split {split!r}; expected one of {SPLITS}")
    return np.random.default_rng([seed, _SPLIT_CODES[split], index])


# ---------------------------------------------------------------------------------------------
# Rendering (pure functions of a random generator)
# ---------------------------------------------------------------------------------------------


def _random_colors(rng, num, saturation, value):
    """Draws ``num`` RGB colours with a uniform hue; returns a [num, 3] float32 array."""
    hsv = np.stack(
        [rng.integers(0, 180, num), rng.integers(*saturation, num), rng.integers(*value, num)], -1
    ).astype(np.uint8)
    return cv2.cvtColor(hsv[None], cv2.COLOR_HSV2RGB)[0].astype(np.float32)


def _smooth_noise(rng, height, width, cells):
    """Band-limited noise: a coarse Gaussian grid (``cells`` along the long side) upsampled.

    Returns:
        [H, W] float32 array, roughly zero-mean with unit variance.
    """
    scale = cells / max(height, width)
    grid_h, grid_w = max(2, round(height * scale)), max(2, round(width * scale))
    grid = rng.standard_normal((grid_h, grid_w), dtype=np.float32)
    return cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)


def _wavy_curve(rng, length, base, amplitude):
    """A smooth random curve ``base + two sinusoids`` sampled at 0..length-1; [length] float32."""
    t = np.arange(length, dtype=np.float32)
    curve = np.full(length, base, np.float32)
    for _ in range(2):
        period = rng.uniform(0.5, 2.0) * length
        phase = rng.uniform(0, 2 * np.pi)
        curve += rng.uniform(0, amplitude) * np.sin(2 * np.pi * t / period + phase)
    return curve


def _draw_stuff_layout(rng, height, width):
    """Splits the image into sky (top) and ground and/or water (below a wavy horizon).

    Returns:
        [H, W] uint8 array of stuff contiguous ids.
    """
    ys = np.arange(height)[:, None]
    xs = np.arange(width)[None, :]
    horizon = _wavy_curve(rng, width, rng.uniform(0.25, 0.55) * height, 0.08 * height)
    below = ys >= horizon[None, :]
    first, second = (GROUND, WATER) if rng.random() < 0.65 else (WATER, GROUND)
    mode = rng.choice(["single", "vertical", "horizontal"], p=[0.3, 0.35, 0.35])
    if mode == "vertical":  # a shoreline running from the horizon to the bottom edge
        shore = _wavy_curve(rng, height, rng.uniform(0.25, 0.75) * width, 0.15 * width)
        shore += rng.uniform(-0.5, 0.5) * (np.arange(height) - height)
        second_region = xs < shore[:, None] if rng.random() < 0.5 else xs >= shore[:, None]
    elif mode == "horizontal":  # a nearer band across the whole width
        shore_base = horizon.mean() + rng.uniform(0.3, 0.7) * (height - horizon.mean())
        second_region = ys >= _wavy_curve(rng, width, shore_base, 0.06 * height)[None, :]
    else:
        second_region = np.zeros((height, width), bool)
    layout = np.full((height, width), SKY, np.uint8)
    layout[below] = first
    layout[below & second_region] = second
    return layout


def _sky_texture(rng, height, width, color):
    """Smooth: a vertical brightness ramp with soft clouds. Returns [H, W, 3] float32."""
    ramp = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    base = color + ramp * rng.uniform(20, 60)
    clouds = np.clip(_smooth_noise(rng, height, width, rng.uniform(3, 6)) - 0.3, 0, 1)
    clouds = 0.7 * clouds[..., None]
    return base * (1 - clouds) + 235 * clouds


def _ground_texture(rng, height, width, color):
    """Grainy: coarse blotches plus strong per-pixel luminance grain. Returns [H, W, 3] float32."""
    blotches = _smooth_noise(rng, height, width, rng.uniform(10, 20))[..., None]
    grain = rng.standard_normal((height, width, 1), dtype=np.float32)
    return color * (1 + 0.15 * blotches) + 22 * grain


def _water_texture(rng, height, width, color):
    """Horizontal ripples whose phase wanders smoothly. Returns [H, W, 3] float32."""
    ys = np.arange(height, dtype=np.float32)[:, None]
    wander = 2.0 * _smooth_noise(rng, height, width, rng.uniform(4, 8))
    ripples = np.sin(2 * np.pi * ys / rng.uniform(4, 8) + wander)[..., None]
    return color + rng.uniform(20, 35) * ripples


_STUFF_TEXTURES = {SKY: _sky_texture, GROUND: _ground_texture, WATER: _water_texture}


def _render_stuff(rng, layout):
    """Paints each stuff region of ``layout`` [H, W] with its texture; returns [H, W, 3] float32."""
    height, width = layout.shape
    image = np.zeros((height, width, 3), np.float32)
    colors = _random_colors(rng, len(_STUFF_TEXTURES), STUFF_SATURATION, STUFF_VALUE)
    for color, (label, texture) in zip(colors, _STUFF_TEXTURES.items()):
        region = layout == label
        if region.any():
            np.copyto(image, texture(rng, height, width, color), where=region[..., None])
    return image


def _sample_center(rng, things, radius, height, width):
    """Places a new shape next to an earlier one (touching or overlapping) or anywhere."""
    if things and rng.random() < TOUCH_PROBABILITY:
        anchor = things[rng.integers(len(things))]
        direction = rng.uniform(0, 2 * np.pi)
        distance = (anchor["radius"] + radius) * rng.uniform(0.6, 1.0)
        center = anchor["center"] + distance * np.array([np.cos(direction), np.sin(direction)])
    else:
        center = rng.uniform(0.3 * radius, [width - 0.3 * radius, height - 0.3 * radius])
    return np.clip(center, 0, [width - 1, height - 1])


def _sample_things(rng, height, width):
    """Samples the thing instances of an image, back to front.

    Returns:
        list[dict]: category (contiguous id), center (x, y), radius, angle, inner (ring hole
        ratio), color [3], shade (brightness change across the shape), shade_angle.
    """
    max_things = int(np.clip(height * width // PIXELS_PER_EXTRA_THING, MIN_THINGS, MAX_THINGS))
    things = []
    for _ in range(rng.integers(MIN_THINGS, max_things + 1)):
        radius = rng.uniform(*OBJECT_SIZE_RANGE) / 2
        thing = {"center": _sample_center(rng, things, radius, height, width), "radius": radius}
        thing.update(
            category=int(rng.integers(NUM_THINGS)),
            angle=rng.uniform(0, 2 * np.pi),
            inner=rng.uniform(0.45, 0.65),
            color=_random_colors(rng, 1, THING_SATURATION, THING_VALUE)[0],
            shade=rng.uniform(-40, 40),
            shade_angle=rng.uniform(0, 2 * np.pi),
        )
        things.append(thing)
    return things


def _thing_mask(thing, height, width):
    """Rasterises one shape (without occlusion); returns an [H, W] bool mask."""
    shift = 4  # cv2 fixed-point sub-pixel precision: coordinates are multiplied by 2**shift
    mask = np.zeros((height, width), np.uint8)
    center = np.round(thing["center"] * 2**shift).astype(np.int32)
    name = THING_NAMES[thing["category"]]
    if name in ("circle", "ring"):
        cv2.circle(
            mask, tuple(center.tolist()), round(thing["radius"] * 2**shift), 1, -1, shift=shift
        )
        if name == "ring":
            hole = round(thing["radius"] * thing["inner"] * 2**shift)
            cv2.circle(mask, tuple(center.tolist()), hole, 0, -1, shift=shift)
    else:
        radii = thing["radius"] * np.array(_POLYGON_RADII[name])
        angles = thing["angle"] + 2 * np.pi * np.arange(len(radii)) / len(radii)
        vertices = thing["center"] + radii[:, None] * np.stack([np.cos(angles), np.sin(angles)], 1)
        cv2.fillPoly(mask, [np.round(vertices * 2**shift).astype(np.int32)], 1, shift=shift)
    return mask.astype(bool)


def _compose_instances(masks, void):
    """Stacks ``masks`` (back to front) under the ``void`` patch.

    Returns:
        [H, W] int32 map: index of the visible mask at each pixel, -1 for none or void.
    """
    instance_map = np.full(void.shape, -1, np.int32)
    for index, mask in enumerate(masks):
        instance_map[mask] = index
    instance_map[void] = -1
    return instance_map


def _visible_things(things, masks, void):
    """Drops the things that are mostly hidden.

    A single pass suffices: removing a thing only uncovers the others.
    """
    instance_map = _compose_instances(masks, void)
    visible = np.bincount(instance_map[instance_map >= 0], minlength=len(masks))
    keep = [
        k
        for k, mask in enumerate(masks)
        if visible[k] >= max(MIN_VISIBLE_AREA, MIN_VISIBLE_FRACTION * mask.sum())
    ]
    return [things[k] for k in keep], [masks[k] for k in keep]


def _paint_thing(image, thing, mask):
    """Paints a shaded, outlined shape into ``image`` [H, W, 3] float32 in place."""
    ys, xs = np.nonzero(mask)
    direction = np.array([np.cos(thing["shade_angle"]), np.sin(thing["shade_angle"])])
    offsets = (np.stack([xs, ys], 1) - thing["center"]) @ direction / thing["radius"]
    image[ys, xs] = thing["color"] + thing["shade"] * offsets[:, None].astype(np.float32)
    # A darker rim keeps touching shapes of similar colour apart.
    interior = cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    image[mask & ~interior] *= OUTLINE_DARKENING


def _sample_void(rng, height, width):
    """An unlabeled clutter patch, or nothing; returns an [H, W] bool mask."""
    void = np.zeros((height, width), bool)
    if rng.random() < VOID_PROBABILITY:
        patch_h, patch_w = rng.integers(*VOID_SIZE_RANGE, 2)
        y0, x0 = rng.integers(0, height - patch_h), rng.integers(0, width - patch_w)
        void[y0 : y0 + patch_h, x0 : x0 + patch_w] = True
    return void


def _paint_void(rng, image, void):
    """Fills the void patch with random 3x3-pixel blocks of colour, in place."""
    ys, xs = np.nonzero(void)
    if len(ys):
        rows, cols = (ys - ys.min()) // 3, (xs - xs.min()) // 3
        blocks = rng.uniform(0, 255, (rows.max() + 1, cols.max() + 1, 3))
        image[ys, xs] = blocks[rows, cols]


def _photometric_jitter(rng, image):
    """Per-channel gain, brightness offset, slight blur and sensor noise.

    Returns:
        [H, W, 3] uint8 image.
    """
    image = image * rng.uniform(0.85, 1.15, 3).astype(np.float32) + rng.uniform(-15, 15)
    image = cv2.GaussianBlur(image, (3, 3), rng.uniform(0.3, 0.8))
    image += rng.uniform(2, 8) * rng.standard_normal(image.shape, dtype=np.float32)
    return np.clip(image + 0.5, 0, 255).astype(np.uint8)


def _segment_info(segment_id, category_id, region):
    """COCO panoptic ``segments_info`` entry of one [H, W] bool region (bbox is XYWH)."""
    ys = np.flatnonzero(region.any(axis=1))
    xs = np.flatnonzero(region.any(axis=0))
    bbox = [int(xs[0]), int(ys[0]), int(xs[-1] - xs[0]) + 1, int(ys[-1] - ys[0]) + 1]
    area = int(np.count_nonzero(region))
    return {"id": segment_id, "category_id": category_id, "iscrowd": 0, "area": area, "bbox": bbox}


def _build_labels(layout, things, masks, void):
    """Semantic map [H, W] uint8, panoptic id map [H, W] int32 and segments_info of an image."""
    instance_map = _compose_instances(masks, void)
    is_thing = instance_map >= 0
    categories = np.array([t["category"] for t in things] + [0], np.uint8)
    sem_seg = layout.copy()
    sem_seg[is_thing] = categories[instance_map[is_thing]]
    sem_seg[void] = IGNORE_LABEL
    panoptic = np.zeros(layout.shape, np.int32)
    segments = []
    for label in _STUFF_TEXTURES:
        region = sem_seg == label
        if region.any():
            segment_id = (label + 1) * LABEL_DIVISOR
            panoptic[region] = segment_id
            segments.append(_segment_info(segment_id, label + 1, region))
    for index, thing in enumerate(things):
        region = instance_map == index
        segment_id = (thing["category"] + 1) * LABEL_DIVISOR + index + 1
        panoptic[region] = segment_id
        segments.append(_segment_info(segment_id, thing["category"] + 1, region))
    return sem_seg, panoptic, segments


def generate_shapes_sample(rng):
    """Renders one image of the dataset with its ground truth.

    Args:
        rng (np.random.Generator): e.g. ``image_rng(seed, split, index)``.

    Returns:
        dict with
            image: [H, W, 3] uint8 RGB image,
            sem_seg: [H, W] uint8 contiguous class ids, 255 on void,
            panoptic: [H, W] int32 segment ids, 0 on void,
            segments_info: list of COCO panoptic segments (COCO category ids = contiguous + 1).
    """
    height, width = (int(s) for s in rng.integers(IMAGE_SIZE_RANGE[0], IMAGE_SIZE_RANGE[1] + 1, 2))
    layout = _draw_stuff_layout(rng, height, width)
    image = _render_stuff(rng, layout)
    things = _sample_things(rng, height, width)
    masks = [_thing_mask(thing, height, width) for thing in things]
    void = _sample_void(rng, height, width)
    things, masks = _visible_things(things, masks, void)
    for thing, mask in zip(things, masks):
        _paint_thing(image, thing, mask)
    _paint_void(rng, image, void)
    sem_seg, panoptic, segments = _build_labels(layout, things, masks, void)
    return {
        "image": _photometric_jitter(rng, image),
        "sem_seg": sem_seg,
        "panoptic": panoptic,
        "segments_info": segments,
    }


# ---------------------------------------------------------------------------------------------
# Writing a split to disk
# ---------------------------------------------------------------------------------------------


def _split_paths(split_dir):
    """Paths of one split's folders and json files (the metadata keys detectron2 uses)."""
    return {
        "image_root": os.path.join(split_dir, "images"),
        "sem_seg_root": os.path.join(split_dir, "sem_seg"),
        "panoptic_root": os.path.join(split_dir, "panoptic"),
        "panoptic_json": os.path.join(split_dir, "panoptic.json"),
        "json_file": os.path.join(split_dir, "instances.json"),
    }


def _imwrite(path, image):
    """Writes an image with OpenCV, raising instead of silently returning False."""
    params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY] if path.endswith(".jpg") else []
    if not cv2.imwrite(path, image, params):
        raise OSError(f"Could not write image {path}")


def _write_sample(paths, stem, sample):
    """Writes the image, semantic PNG and panoptic PNG of one sample."""
    _imwrite(os.path.join(paths["image_root"], stem + ".jpg"), sample["image"][:, :, ::-1])
    _imwrite(os.path.join(paths["sem_seg_root"], stem + ".png"), sample["sem_seg"])
    panoptic_rgb = id2rgb(sample["panoptic"])
    _imwrite(os.path.join(paths["panoptic_root"], stem + ".png"), panoptic_rgb[:, :, ::-1])


def _instance_annotations(image_id, sample, first_id):
    """COCO instance annotations (RLE masks) of the things of one sample."""
    annotations = []
    for segment in sample["segments_info"]:
        if segment["category_id"] not in THING_IDS:
            continue
        mask = np.asfortranarray((sample["panoptic"] == segment["id"]).astype(np.uint8))
        rle = mask_util.encode(mask)
        annotation = {"id": first_id + len(annotations), "image_id": image_id}
        annotation.update({k: segment[k] for k in ("category_id", "iscrowd", "area", "bbox")})
        annotation["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
        annotations.append(annotation)
    return annotations


def _write_json(path, content):
    """Writes ``content`` as json (compact, so large splits stay small and quick to read)."""
    with open(path, "w") as f:
        json.dump(content, f)


def _marker_content(split, num_images, seed):
    """What the completion marker of a split generated with these settings holds."""
    return {
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "split": split,
        "num_images": num_images,
    }


def _generate_split_files(paths, split, num_images, seed):
    """Renders and writes every image of a split.

    Returns:
        (images, instance annotations, panoptic annotations) in COCO json form.
    """
    images, instance_anns, panoptic_anns = [], [], []
    for index in range(num_images):
        image_id = index + 1
        stem = f"{image_id:06d}"
        sample = generate_shapes_sample(image_rng(seed, split, index))
        _write_sample(paths, stem, sample)
        height, width = sample["sem_seg"].shape
        images.append(
            {"id": image_id, "file_name": stem + ".jpg", "height": height, "width": width}
        )
        instance_anns.extend(_instance_annotations(image_id, sample, len(instance_anns) + 1))
        panoptic_anns.append(
            {
                "image_id": image_id,
                "file_name": stem + ".png",
                "segments_info": sample["segments_info"],
            }
        )
        if (index + 1) % LOG_EVERY == 0 or index + 1 == num_images:
            logger.info("shapes/%s: %d / %d images written", split, index + 1, num_images)
    return images, instance_anns, panoptic_anns


def _generate_split(split_dir, split, num_images, seed):
    """Generates a split into a temporary folder, then moves it to ``split_dir``.

    The completion marker is written last; the final rename keeps concurrent readers (e.g. other
    training processes) from ever seeing a half-written split under ``split_dir``.
    """
    tmp_dir = f"{split_dir}.tmp-{os.getpid()}"
    if os.path.exists(tmp_dir):
        shutil.rmtree(tmp_dir)
    paths = _split_paths(tmp_dir)
    for key in ("image_root", "sem_seg_root", "panoptic_root"):
        os.makedirs(paths[key])
    images, instance_anns, panoptic_anns = _generate_split_files(paths, split, num_images, seed)
    thing_categories = [
        {"id": c["id"], "name": c["name"]} for c in SHAPES_CATEGORIES if c["isthing"]
    ]
    _write_json(
        paths["json_file"],
        {"images": images, "annotations": instance_anns, "categories": thing_categories},
    )
    _write_json(
        paths["panoptic_json"],
        {"images": images, "annotations": panoptic_anns, "categories": SHAPES_CATEGORIES},
    )
    _write_json(os.path.join(tmp_dir, MARKER_FILE), _marker_content(split, num_images, seed))
    if _split_problem(split_dir, split, num_images, seed) is None:
        shutil.rmtree(tmp_dir)  # another process finished the same split first
        return
    if os.path.exists(split_dir):
        shutil.rmtree(split_dir)
    os.rename(tmp_dir, split_dir)


def _missing_files(split_dir, num_images):
    """Describes the first expected file missing from a split, or returns None."""
    paths = _split_paths(split_dir)
    for key in ("json_file", "panoptic_json"):
        if not os.path.isfile(paths[key]):
            return f"{paths[key]} is missing"
    for key, ext in (("image_root", ".jpg"), ("sem_seg_root", ".png"), ("panoptic_root", ".png")):
        if not os.path.isdir(paths[key]):
            return f"{paths[key]} is missing"
        present = set(os.listdir(paths[key]))
        for image_id in range(1, num_images + 1):
            if f"{image_id:06d}{ext}" not in present:
                return f"{os.path.join(paths[key], f'{image_id:06d}{ext}')} is missing"
    return None


def _split_problem(split_dir, split, num_images, seed):
    """Says why ``split_dir`` is not a complete split for these settings, or returns None."""
    marker_path = os.path.join(split_dir, MARKER_FILE)
    if not os.path.isfile(marker_path):
        return f"completion marker {marker_path} is missing"
    try:
        with open(marker_path) as f:
            marker = json.load(f)
    except (OSError, ValueError) as e:
        return f"completion marker {marker_path} is unreadable ({e})"
    expected = _marker_content(split, num_images, seed)
    if marker != expected:
        return f"completion marker {marker_path} holds {marker}, expected {expected}"
    return _missing_files(split_dir, num_images)


def _check_num_images(split, num_images):
    """Validates a requested split size; None means the default size."""
    if num_images is None:
        return DEFAULT_NUM_IMAGES[split]
    if isinstance(num_images, bool) or not isinstance(num_images, (int, np.integer)):
        raise TypeError(f"Number of shapes {split} images must be an int, got {num_images!r}")
    if num_images < 1:
        raise ValueError(f"Number of shapes {split} images must be positive, got {num_images}")
    return int(num_images)


def default_shapes_root():
    """``$DETECTRON2_DATASETS/shapes`` (``datasets/shapes`` when the variable is unset)."""
    return os.path.join(os.getenv("DETECTRON2_DATASETS", "datasets"), "shapes")


def _ensure_split(split_dir, split, num_images, seed):
    """(Re)generates ``split_dir`` unless it is complete for these settings."""
    problem = _split_problem(split_dir, split, num_images, seed)
    if problem is None:
        return
    if os.path.exists(split_dir):
        logger.warning(
            "Shapes split %s is incomplete or stale: %s. Regenerating it.", split_dir, problem
        )
    logger.info(
        "Generating %d shapes %s images into %s (seed %d)", num_images, split, split_dir, seed
    )
    _generate_split(split_dir, split, num_images, seed)


def prepare_shapes_dataset(
    root=None, num_train=None, num_val=None, seed=DEFAULT_SEED, splits=SPLITS
):
    """Generates the shapes dataset unless a complete copy with the same settings exists.

    A split whose completion marker is missing or differs (generator version, seed, count), or
    that lacks a file, is regenerated from scratch with a warning.

    Args:
        root (str or None): dataset folder; default ``$DETECTRON2_DATASETS/shapes``.
        num_train (int or None): train images; default 1000.
        num_val (int or None): val images; default 100.
        seed (int): dataset seed; image ``i`` of a split depends only on (seed, split, i).
        splits (tuple[str]): the splits to prepare.

    Returns:
        dict[str, str]: split name -> split folder.
    """
    root = default_shapes_root() if root is None else os.fspath(root)
    if os.path.exists(root) and not os.path.isdir(root):
        raise NotADirectoryError(f"Shapes dataset root {root} exists but is not a directory")
    requested = {"train": num_train, "val": num_val}
    split_dirs = {}
    for split in splits:
        if split not in SPLITS:
            raise ValueError(f"Unknown shapes split {split!r}; expected one of {SPLITS}")
        split_dirs[split] = os.path.join(root, split)
        _ensure_split(split_dirs[split], split, _check_num_images(split, requested[split]), seed)
    return split_dirs


# ---------------------------------------------------------------------------------------------
# Loading and registration
# ---------------------------------------------------------------------------------------------


def num_images_from_env(split):
    """The size of ``split`` set by ``MASK_FORMER_SHAPES_NUM_{TRAIN,VAL}``, or None when unset."""
    name = NUM_IMAGES_ENV[split]
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"Environment variable {name}={value!r} is not an integer") from None


def _prepare_split(root, split):
    """Prepares one split with the sizes from the environment; returns its paths."""
    counts = {"num_train": num_images_from_env("train"), "num_val": num_images_from_env("val")}
    split_dir = prepare_shapes_dataset(root, splits=(split,), **counts)[split]
    return _split_paths(split_dir)


def _image_sizes(panoptic_json):
    """Maps file stem -> (height, width) from the ``images`` of a COCO json."""
    with open(panoptic_json) as f:
        images = json.load(f)["images"]
    return {os.path.splitext(im["file_name"])[0]: (im["height"], im["width"]) for im in images}


def _load_shapes_sem_seg(root, split, dataset_name):
    """Semantic segmentation dicts: ``load_sem_seg`` records plus height and width."""
    paths = _prepare_split(root, split)
    records = load_sem_seg(
        paths["sem_seg_root"], paths["image_root"], gt_ext="png", image_ext="jpg"
    )
    sizes = _image_sizes(paths["panoptic_json"])
    for record in records:
        stem = os.path.splitext(os.path.basename(record["file_name"]))[0]
        record["height"], record["width"] = sizes[stem]
    return records


def _load_shapes_instances(root, split, dataset_name):
    """Instance segmentation dicts, as ``load_coco_json`` reads them (RLE masks)."""
    paths = _prepare_split(root, split)
    return load_coco_json(paths["json_file"], paths["image_root"], dataset_name)


def _load_shapes_panoptic(root, split, dataset_name):
    """Panoptic dicts as ``load_coco_panoptic_json`` returns them, plus sem_seg_file_name, height
    and width."""
    paths = _prepare_split(root, split)
    meta = shapes_class_metadata()
    records = load_coco_panoptic_json(
        paths["panoptic_json"], paths["image_root"], paths["panoptic_root"], meta
    )
    sizes = _image_sizes(paths["panoptic_json"])
    for record in records:
        stem = os.path.splitext(os.path.basename(record["pan_seg_file_name"]))[0]
        record["sem_seg_file_name"] = os.path.join(paths["sem_seg_root"], stem + ".png")
        record["height"], record["width"] = sizes[stem]
    return records


def shapes_class_metadata():
    """Class names, colours and id maps shared by all shapes datasets.

    Contiguous ids: things first (0..4), then stuff (5..7); ``stuff_classes`` lists all classes
    (detectron2's convention for semantic and panoptic segmentation).
    """
    things = [c for c in SHAPES_CATEGORIES if c["isthing"]]
    return {
        "thing_classes": [c["name"] for c in things],
        "thing_colors": [c["color"] for c in things],
        "stuff_classes": [c["name"] for c in SHAPES_CATEGORIES],
        "stuff_colors": [c["color"] for c in SHAPES_CATEGORIES],
        "thing_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(things)},
        "stuff_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(SHAPES_CATEGORIES)},
    }


# task -> (loader(shapes_root, split, dataset_name), evaluator_type); every loader takes the
# dataset name, though only load_coco_json uses it (to record the class metadata it reads).
_TASKS = {
    "sem_seg": (_load_shapes_sem_seg, "sem_seg"),
    "instance": (_load_shapes_instances, "coco"),
    "panoptic": (_load_shapes_panoptic, "coco_panoptic_seg"),
}


def register_all_shapes(root, prefix="shapes"):
    """Registers ``{prefix}_{sem_seg,instance,panoptic}_{train,val}``, data under ``root/shapes``.

    Nothing is generated here: the loaders call :func:`prepare_shapes_dataset` on first use, with
    split sizes from ``MASK_FORMER_SHAPES_NUM_TRAIN`` / ``MASK_FORMER_SHAPES_NUM_VAL``.

    Args:
        root (str): the datasets folder, like ``$DETECTRON2_DATASETS``.
        prefix (str): prefix of the dataset names.
    """
    shapes_root = os.path.join(os.fspath(root), "shapes")
    for split in SPLITS:
        metadata = dict(
            shapes_class_metadata(),
            ignore_label=IGNORE_LABEL,
            label_divisor=LABEL_DIVISOR,
            **_split_paths(os.path.join(shapes_root, split)),
        )
        for task, (load, evaluator_type) in _TASKS.items():
            name = f"{prefix}_{task}_{split}"
            loader = functools.partial(load, shapes_root, split, name)
            # Nothing to check beforehand: the loader generates what is missing.
            register_dataset(
                name, loader, dict(metadata, evaluator_type=evaluator_type), required={}
            )


register_all_shapes(datasets_root())
