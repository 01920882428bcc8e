"""Which class each CAM explains: `--target predicted|label|class:N|topk:K`."""

from __future__ import annotations

import dataclasses

from transforms.errors import AuditError

TARGET_HELP = "predicted | label | class:N | topk:K"


@dataclasses.dataclass(frozen=True)
class TargetSpec:
    """A parsed `--target`.

    Attributes:
      mode: "predicted", "label", "class" or "topk".
      class_index: the fixed class for mode "class", else -1.
      k: CAM rows per image (K for "topk", 1 otherwise).
    """

    mode: str = "predicted"
    class_index: int = -1
    k: int = 1

    @property
    def needs_label(self) -> bool:
        return self.mode == "label"

    def __str__(self) -> str:
        if self.mode == "class":
            return f"class:{self.class_index}"
        if self.mode == "topk":
            return f"topk:{self.k}"
        return self.mode


def parse_target(text: str) -> TargetSpec:
    """Parses `predicted`, `label`, `class:N` (N >= 0) or `topk:K` (K >= 1)."""
    value = str(text).strip().lower()
    if value in ("predicted", "label"):
        return TargetSpec(mode=value)
    name, _, number = value.partition(":")
    if name in ("class", "topk") and number.isdigit():
        n = int(number)
        if name == "class":
            return TargetSpec(mode="class", class_index=n)
        if n >= 1:
            return TargetSpec(mode="topk", k=n)
    raise AuditError(f"--target: expected {TARGET_HELP}, got {text!r}")


def select_targets(spec: TargetSpec, logits, requested):
    """Target classes [B, K] int32 for a batch.

    Args:
      spec: the parsed target.
      logits: float32 [B, num_classes].
      requested: int32 [B], the label per image (used for mode "label").
    """
    import tensorflow as tf

    batch = tf.shape(logits)[0]
    if spec.mode == "predicted":
        return tf.expand_dims(tf.argmax(logits, axis=-1, output_type=tf.int32), 1)
    if spec.mode == "label":
        return tf.expand_dims(tf.cast(requested, tf.int32), 1)
    if spec.mode == "class":
        return tf.fill([batch, 1], tf.constant(spec.class_index, tf.int32))
    return tf.math.top_k(logits, k=spec.k, sorted=True).indices
