"""Where a model comes from: what the user typed resolved to files (`resolve`, `registry`), the
config read into a `ModelSpec`, the family record that says what differs per architecture (`families`),
and lazy, tensor-by-tensor weights (`load`).

May import: edgekit.errors only (and torch/transformers inside functions, never at import time).
"""
