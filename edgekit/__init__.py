"""edgekit: strip redundant attention sublayers from Llama-style models and ship them as ONNX bundles.

Subpackages follow the pipeline, each importing only the ones below it (checked by `make lint`):
cli → sweep → targets → export → quality → skip → runtime → bundle → checkpoint → errors.
"""

from pathlib import Path

__version__ = "0.1.0"

DATA_DIR = Path(__file__).parent / "data"  # shipped model, calibration text, recipes
CALIB_TEXT = DATA_DIR / "calib-tinystories.txt"
