"""COCO instance evaluation for panoptic datasets whose thing classes are not the first ids."""

from detectron2.data.catalog import Metadata
from detectron2.evaluation import COCOEvaluator

__all__ = ["InstanceSegEvaluator"]


class InstanceSegEvaluator(COCOEvaluator):
    """
    detectron2's ``COCOEvaluator`` for datasets whose ``thing_dataset_id_to_contiguous_id`` maps
    each thing to its index among *all* classes (ADE20K and Mapillary Vistas panoptic), where
    ``COCOEvaluator`` requires thing ids 0..T-1.

    Predicted classes are renumbered to 0..T-1 (things in contiguous-id order) and predictions of
    non-thing classes are dropped before ``COCOEvaluator`` maps them back to dataset ids; nothing
    else changes.
    """

    def __init__(self, dataset_name, *args, **kwargs):
        """
        Args:
            dataset_name (str): a registered dataset with ``thing_dataset_id_to_contiguous_id``
                and an instance ``json_file``.
            args, kwargs: the other arguments of ``COCOEvaluator``.
        """
        super().__init__(dataset_name, *args, **kwargs)
        thing_map = self._metadata.thing_dataset_id_to_contiguous_id
        dataset_ids = sorted(thing_map, key=thing_map.get)
        self._class_to_thing_index = {thing_map[d]: i for i, d in enumerate(dataset_ids)}
        # A private copy: the catalog's metadata must not change under other users.
        self._metadata = Metadata(
            **dict(
                self._metadata.as_dict(),
                thing_dataset_id_to_contiguous_id={d: i for i, d in enumerate(dataset_ids)},
            )
        )

    def _eval_predictions(self, predictions, img_ids=None):
        for prediction in predictions:
            if "instances" in prediction:
                prediction["instances"] = [
                    dict(result, category_id=self._class_to_thing_index[result["category_id"]])
                    for result in prediction["instances"]
                    if result["category_id"] in self._class_to_thing_index
                ]
        super()._eval_predictions(predictions, img_ids=img_ids)
