#!/usr/bin/env python
"""The published name of ``tools/convert_swin_to_d2.py``, so that the published model-zoo
instructions work as written:

    python tools/convert-pretrained-swin-model-to-d2.py swin_tiny_patch4_window7_224.pth \
        swin_tiny_patch4_window7_224.pkl
"""

import os
import runpy

if __name__ == "__main__":
    runpy.run_path(
        os.path.join(os.path.dirname(os.path.abspath(__file__)), "convert_swin_to_d2.py"),
        run_name="__main__",
    )
