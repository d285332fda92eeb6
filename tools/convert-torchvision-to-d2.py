#!/usr/bin/env python
"""The published name of ``tools/convert_torchvision_to_d2.py``, so that the published model-zoo
instructions work as written:

    python tools/convert-torchvision-to-d2.py R-50.pth R-50.pkl
"""

import os
import runpy

if __name__ == "__main__":
    runpy.run_path(
        os.path.join(os.path.dirname(os.path.abspath(__file__)), "convert_torchvision_to_d2.py"),
        run_name="__main__",
    )
