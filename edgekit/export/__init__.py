"""Checkpoint in, bundle folder out: the pipeline (`pipeline`) sequences the stages: memory plans
(`memory`, `budget`), the fused and standard graph writers (`graph`, `graph_standard`), weight
quantization (`quantize`), verification against PyTorch (`verify`, `verify_streaming`), and the device
files a target asks for (`device`, `mobile`).

May import: quality, skip, runtime, bundle, checkpoint, errors.
"""
