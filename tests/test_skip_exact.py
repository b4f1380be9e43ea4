"""Skipping is exact: a skipped layer behaves as if its attention output were forced to zero."""

import torch

from edgekit.checkpoint.load import load_torch_model, open_checkpoint
from edgekit.skip.skipset import SkipSet
from edgekit.skip.surgery import AttentionFreeDecoderLayer, apply_skip, full_logits

IDS = [1, 403, 407, 261, 378, 308, 260, 403, 429, 414, 280, 300]


def _model(stories_path):
    return load_torch_model(open_checkpoint(stories_path, "stories260k"))


def _zero_attention_reference(model, layers):
    def zero(module, args, output):
        return (torch.zeros_like(output[0]), *output[1:])

    hooks = [model.model.layers[i].self_attn.register_forward_hook(zero) for i in layers]
    try:
        return full_logits(model, IDS)
    finally:
        for h in hooks:
            h.remove()


def test_skipped_logits_equal_zeroed_attention(stories_path):
    for layers in [(3, 4), (1, 3), (0,)]:
        reference = _zero_attention_reference(_model(stories_path), layers)
        skipped = apply_skip(_model(stories_path), SkipSet.explicit(list(layers), 5))
        got = full_logits(skipped, IDS)
        assert torch.allclose(got, reference, atol=1e-6), layers
        unskipped = full_logits(_model(stories_path), IDS)
        assert not torch.allclose(got, unskipped, atol=1e-3)  # the skip really changes something


def test_dropped_modules_are_gone(stories_path):
    model = apply_skip(_model(stories_path), SkipSet.explicit([3, 4], 5))
    names = {n for n, _ in model.named_parameters()}
    for i in (3, 4):
        assert isinstance(model.model.layers[i], AttentionFreeDecoderLayer)
        assert not any(n.startswith(f"model.layers.{i}.self_attn") for n in names)
        assert f"model.layers.{i}.input_layernorm.weight" not in names
        assert f"model.layers.{i}.mlp.down_proj.weight" in names
        assert f"model.layers.{i}.post_attention_layernorm.weight" in names
    assert "model.layers.2.self_attn.q_proj.weight" in names
