"""Device targets: the shipped recipes (skip, quant, flavour, context, memory budget, providers per
device) and their validation (`recipes`).

May import: export, quality, skip, runtime, bundle, checkpoint, errors.
"""
