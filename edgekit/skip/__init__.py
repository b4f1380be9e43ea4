"""Which attention sublayers go: skip sets and the user's choice of them (`skipset`), the surgery on
a PyTorch model (`surgery`), and a layer-at-a-time PyTorch reference for models too big for memory
(`streaming`). Choosing a skip set *by measuring* the model lives in `quality.analyze`.

May import: checkpoint, errors.
"""
