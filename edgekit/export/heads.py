"""Attention heads as GroupQueryAttention's CPU kernel needs them: head_dim a multiple of 16, padded
with zeros so rotary pairs stay intact (every graph flavour and the calibrators share this layout)."""

from __future__ import annotations

import numpy as np

GQA_HEAD_MULTIPLE = 16  # onnxruntime's CPU GroupQueryAttention needs head_size % 16 == 0


def padded_head_dim(head_dim: int) -> int:
    return -(-head_dim // GQA_HEAD_MULTIPLE) * GQA_HEAD_MULTIPLE


def pad_heads(x: np.ndarray, heads: int, head_dim: int, axis: int) -> np.ndarray:
    """Zero-pad each head along `axis` from head_dim to the GQA multiple, keeping rotary pairs intact.

    Rotary (rotate_half) pairs dimension j with j + d/2, so the real halves go to the front of each
    padded half: [a0..a3, 0.., a4..a7, 0..]. Zeros add nothing to q·k and the padded value columns meet
    zero columns of o_proj, so the attention result is unchanged; only the KV cache is wider.
    """
    pdim = padded_head_dim(head_dim)
    if pdim == head_dim:
        return x
    x = np.moveaxis(x, axis, 0)
    heads_view = x.reshape(heads, head_dim, *x.shape[1:])
    out = np.zeros((heads, pdim, *x.shape[1:]), dtype=x.dtype)
    half, phalf = head_dim // 2, pdim // 2
    out[:, :half] = heads_view[:, :half]
    out[:, phalf : phalf + half] = heads_view[:, half:]
    return np.moveaxis(out.reshape(heads * pdim, *x.shape[1:]), 0, axis)


def pad_rotary(table: np.ndarray, head_dim: int, fill: float) -> np.ndarray:
    pdim = padded_head_dim(head_dim)
    if pdim == head_dim:
        return table
    pad = np.full((table.shape[0], (pdim - head_dim) // 2), fill, dtype=table.dtype)
    return np.concatenate([table, pad], axis=1)
