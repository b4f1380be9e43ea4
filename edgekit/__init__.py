"""edgekit: strip redundant attention sublayers from Llama-style models and ship them as ONNX bundles."""

__version__ = "0.1.0"
