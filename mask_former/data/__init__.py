from . import datasets  # noqa: F401  (registers datasets)
from .dataset_mappers import DATASET_MAPPERS, build_train_mapper  # noqa: F401
