"""Installs the ``mask_former`` package (MaskFormer and Mask2Former for detectron2).

detectron2 is installed separately, as upstream detectron2 projects document it; see README.md.
"""

from setuptools import find_packages, setup

setup(
    name="mask_former",
    version="0.1.0",
    description="MaskFormer and Mask2Former: universal image segmentation by mask classification, "
    "as a detectron2 extension",
    packages=find_packages(include=("mask_former", "mask_former.*")),
    # category tables of the dataset registrations
    package_data={"mask_former.data.datasets": ["categories/*.json"]},
    python_requires=">=3.8",
    install_requires=[
        "torch>=1.9",
        "torchvision",
        "fvcore",
        "pycocotools",
        "opencv-python-headless",
        "scipy",
        "numpy",
        "pillow",
        "timm",
    ],
    extras_require={"test": ["pytest"]},
)
