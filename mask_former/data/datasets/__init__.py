"""Dataset registrations; importing a module registers its datasets (data is read on use).

The real datasets live under ``$DETECTRON2_DATASETS`` (default "datasets"); ``datasets/README.md``
shows their layout and the scripts that prepare them. Cityscapes and COCO instances are
detectron2's own registrations, used as they are.
"""

from . import (  # noqa: F401
    ade20k,
    ade20k_full,
    coco_panoptic,
    coco_stuff_10k,
    mapillary_vistas,
    shapes,
)
