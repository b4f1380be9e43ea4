"""How good a model is: perplexity math (`perplexity`), scorers over bundles and checkpoints
(`scorers`, `models`, `streaming`), zero-shot tasks (`tasks`), the `eval` command's library
(`evaluate`), the export's quality gate (`gate`), layer importance and auto:N (`analyze`), and the
lm-evaluation-harness adapter (`lmeval_adapter`).

May import: skip, runtime, bundle, checkpoint, errors.
"""
