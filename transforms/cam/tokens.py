"""Token maps: a transformer layer's (B, P+N, D) output explained on its patch grid.

A Vision Transformer's blocks output a sequence of tokens: P prefix tokens
(class, distillation, register tokens) then N = h * w patch tokens in
row-major order of the patch grid. Such a layer is explained by dropping the
prefix tokens and reshaping the patch tokens to (B, h, w, D) (activations and
their gradients alike), so every CAM method runs unchanged on the grid.

The grid (h, w) and P come, in this order, from `--token_grid HxW` /
`--prefix_tokens P`; from a layer with a 4-D output before the target layer
(the patch embedding's Conv2D: (B, h, w, D)) whose h * w is the sequence
length less at most `MAX_PREFIX` tokens; from the sequence length itself, when
exactly one split P + h * w has h / w equal to the image's aspect ratio (a
square image: N a perfect square). Anything else is one line saying which
option to pass.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

from transforms.errors import AuditError

MAX_PREFIX = 8  # class + distillation + register tokens considered when the split is inferred
TOKEN_OPTIONS = "pass --token_grid HxW (the patch grid, rows x columns) and --prefix_tokens P (class/distillation/register tokens before the patches)"


@dataclasses.dataclass(frozen=True)
class TokenLayout:
    """How a (B, S, D) sequence maps onto the patch grid: S = prefix + height * width.

    Attributes:
      prefix: tokens dropped from the start of the sequence (P).
      height, width: the patch grid (h, w); tokens are row-major.
      source: how it was found ("options", "patch embedding <layer>", "sequence length").
    """

    prefix: int
    height: int
    width: int
    source: str

    def as_json(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        return f"{self.prefix} prefix token(s) + {self.height}x{self.width} patch grid ({self.source})"


def parse_token_grid(text: str) -> tuple[int, int]:
    """`HxW` (e.g. "14x14") -> (h, w); AuditError otherwise."""
    height, sep, width = str(text).strip().lower().partition("x")
    if sep and height.isdigit() and width.isdigit() and int(height) >= 1 and int(width) >= 1:
        return int(height), int(width)
    raise AuditError(f"--token_grid: expected ROWSxCOLUMNS of the patch grid such as 14x14, got {text!r}")


def _aspect_grid(tokens: int, input_hw: Sequence[int]) -> Optional[tuple[int, int]]:
    """(h, w) with h * w = tokens and h / w = H / W exactly, or None."""
    height, width = int(input_hw[0]), int(input_hw[1])
    if tokens < 2:
        return None
    h = math.isqrt(tokens * height // width) if (tokens * height) % width == 0 else 0
    for guess in (h - 1, h, h + 1):
        if guess >= 1 and tokens % guess == 0 and guess * width == (tokens // guess) * height:
            return guess, tokens // guess
    return None


def infer_token_layout(
    seq_len: int,
    *,
    layer: str,
    shape: tuple,
    input_hw: Sequence[int],
    patch_grids: Sequence[tuple[str, int, int]] = (),
    token_grid: Optional[tuple[int, int]] = None,
    prefix_tokens: Optional[int] = None,
) -> TokenLayout:
    """The layout of a sequence of `seq_len` tokens (see the module docstring).

    Args:
      seq_len: S, the sequence length of the target layer's output.
      layer, shape: the target layer's path and output shape (for messages).
      input_hw: (H, W) of the model's input images.
      patch_grids: (path, h, w) of layers with a 4-D output before the target layer, in call order.
      token_grid, prefix_tokens: `--token_grid` and `--prefix_tokens` when given.

    Raises:
      AuditError: one line saying what does not fit and which option to pass.
    """
    where = f"--target_layer {layer!r} outputs tokens {shape}"
    if prefix_tokens is not None and not 0 <= prefix_tokens < seq_len:
        raise AuditError(f"{where}: --prefix_tokens {prefix_tokens} leaves no patch token of {seq_len}")
    if token_grid is not None:
        h, w = token_grid
        prefix = seq_len - h * w if prefix_tokens is None else prefix_tokens
        if prefix < 0 or prefix + h * w != seq_len or (prefix_tokens is None and prefix > MAX_PREFIX):
            raise AuditError(
                f"{where}: {seq_len} tokens are not {prefix_tokens or 0} prefix token(s) + a {h}x{w} grid "
                f"({h * w} patches); pass --token_grid and --prefix_tokens with P + H * W = {seq_len}"
            )
        return TokenLayout(prefix, h, w, "options --token_grid/--prefix_tokens")
    prefixes = [prefix_tokens] if prefix_tokens is not None else list(range(0, min(MAX_PREFIX, seq_len - 1) + 1))
    for path, h, w in reversed(list(patch_grids)):
        if h * w > 1 and seq_len - h * w in prefixes:
            return TokenLayout(seq_len - h * w, h, w, f"patch embedding {path!r} {h}x{w}")
    fits = [(p, grid) for p in prefixes if (grid := _aspect_grid(seq_len - p, input_hw))]
    if prefix_tokens is None and fits and fits[0][0] == 0:
        fits = fits[:1]  # a sequence that is a grid as it is has no prefix token
    if len(fits) == 1:
        p, (h, w) = fits[0]
        return TokenLayout(p, h, w, f"sequence length {seq_len} = {p} + {h}x{w} (image {input_hw[0]}x{input_hw[1]})")
    if fits:
        options = ", ".join(f"{p} + {h}x{w}" for p, (h, w) in fits)
        raise AuditError(f"{where}: {seq_len} tokens split several ways ({options}); {TOKEN_OPTIONS}")
    raise AuditError(
        f"{where}: {seq_len} tokens match no patch grid of the {input_hw[0]}x{input_hw[1]} image; {TOKEN_OPTIONS}"
    )


def tokens_to_grid(tensor, layout: TokenLayout):
    """(B, P+N, D) -> (B, h, w, D): prefix tokens dropped, patch tokens row-major."""
    import tensorflow as tf

    patches = tensor[:, layout.prefix:, :]
    depth = tensor.shape[-1] if tensor.shape[-1] is not None else tf.shape(tensor)[-1]
    return tf.reshape(patches, [-1, layout.height, layout.width, depth])
