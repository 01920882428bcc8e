"""Which class each CAM explains: `--target predicted|label|class:N|topk:K|labels|above:T`."""

from __future__ import annotations

import dataclasses

from transforms.errors import AuditError

TARGET_HELP = "predicted | label | class:N | topk:K | labels | above:T"
LABEL_FORMATS = ("single", "index", "multi_hot")
DEFAULT_MAX_TARGETS = 8  # maps computed per image for `labels` / `above:T` (`--max_targets`)


@dataclasses.dataclass(frozen=True)
class TargetSpec:
    """A parsed `--target`.

    Attributes:
      mode: "predicted", "label", "class", "topk", "labels" (every true label
        of a multi-label record) or "above" (every class scoring >= threshold).
      class_index: the fixed class for mode "class", else -1.
      k: CAM rows per image (K for "topk", 1 for the single modes); for the
        variable modes "labels" and "above" the most maps computed per image
        (`--max_targets`; the rows are the valid ones among them).
      threshold: T of "above:T" (a sigmoid score in (0, 1]), else None.
    """

    mode: str = "predicted"
    class_index: int = -1
    k: int = 1
    threshold: float | None = None

    @property
    def needs_label(self) -> bool:
        return self.mode in ("label", "labels")

    @property
    def variable(self) -> bool:
        """A variable number of targets per image: K slots, the valid ones become rows."""
        return self.mode in ("labels", "above")

    def __str__(self) -> str:
        if self.mode == "class":
            return f"class:{self.class_index}"
        if self.mode == "topk":
            return f"topk:{self.k}"
        if self.mode == "above":
            return f"above:{self.threshold:g}"
        return self.mode


def parse_target(text: str, max_targets: int = DEFAULT_MAX_TARGETS) -> TargetSpec:
    """Parses `predicted`, `label`, `class:N` (N >= 0), `topk:K` (K >= 1), `labels` or `above:T` (0 < T <= 1).

    `max_targets` is the `k` of the variable modes (`labels`, `above:T`).
    """
    value = str(text).strip().lower()
    if value in ("predicted", "label"):
        return TargetSpec(mode=value)
    if value == "labels":
        return TargetSpec(mode="labels", k=max_targets)
    name, _, number = value.partition(":")
    if name == "above":
        try:
            threshold = float(number)
        except ValueError:
            threshold = float("nan")
        if 0.0 < threshold <= 1.0:
            return TargetSpec(mode="above", k=max_targets, threshold=threshold)
        raise AuditError(f"--target above:T: expected a score threshold 0 < T <= 1, got {text!r}")
    if name in ("class", "topk") and number.isdigit():
        n = int(number)
        if name == "class":
            return TargetSpec(mode="class", class_index=n)
        if n >= 1:
            return TargetSpec(mode="topk", k=n)
    raise AuditError(f"--target: expected {TARGET_HELP}, got {text!r}")


def check_label_format(spec: TargetSpec, label_format: str) -> None:
    """AuditError (one line, before the job starts) for a target the label format cannot serve."""
    if label_format not in LABEL_FORMATS:
        raise AuditError(f"--label_format: expected one of {', '.join(LABEL_FORMATS)}, got {label_format!r}")
    if spec.mode == "labels" and label_format == "single":
        raise AuditError(
            "--target labels explains every true label of a multi-label record: pass --label_format index "
            "(int64 class indices) or multi_hot (one 0/1 int64 per class); with one label per image use --target label"
        )
    if spec.mode == "label" and label_format != "single":
        raise AuditError(
            f"--target label explains one label per image, but --label_format {label_format} gives a list: "
            "use --target labels (one map per true label)"
        )


def select_targets(spec: TargetSpec, logits, requested):
    """Target classes [B, K] int32 and which of them are real targets [B, K] bool, for a batch.

    Args:
      spec: the parsed target.
      logits: float32 [B, num_classes].
      requested: int32 [B], the label per image (mode "label"), or for mode
        "labels" int32 [B, num_classes], the multi-hot true labels.

    For the variable modes ("labels", "above"), the K slots hold the wanted
    classes by descending score, then filler; an image with no wanted class
    (no true label, nothing above T) gets its top-scoring class in slot 0, so
    every image has a rank-0 row. The fixed modes' slots are all valid.
    """
    import tensorflow as tf

    batch = tf.shape(logits)[0]
    if spec.variable:
        k = spec.k
        if spec.mode == "labels":
            wanted = tf.cast(requested, tf.int32) > 0
        else:
            wanted = tf.sigmoid(logits) >= spec.threshold
        keyed = tf.where(wanted, logits, tf.fill(tf.shape(logits), tf.constant(-float("inf"), tf.float32)))
        top = tf.math.top_k(keyed, k=k, sorted=True)
        valid = tf.gather(wanted, top.indices, batch_dims=1)
        best = tf.argmax(logits, axis=-1, output_type=tf.int32)
        none = tf.logical_not(tf.reduce_any(valid, axis=-1))  # [B]: fall back to the top-scoring class
        first = tf.one_hot(0, k, on_value=True, off_value=False, dtype=tf.bool)[None, :]  # [1, K]
        fallback = tf.logical_and(none[:, None], first)
        targets = tf.where(valid, top.indices, tf.broadcast_to(best[:, None], tf.shape(top.indices)))
        return targets, tf.logical_or(valid, fallback)
    if spec.mode == "predicted":
        targets = tf.expand_dims(tf.argmax(logits, axis=-1, output_type=tf.int32), 1)
    elif spec.mode == "label":
        targets = tf.expand_dims(tf.cast(requested, tf.int32), 1)
    elif spec.mode == "class":
        targets = tf.fill([batch, 1], tf.constant(spec.class_index, tf.int32))
    else:
        targets = tf.math.top_k(logits, k=spec.k, sorted=True).indices
    return targets, tf.ones_like(targets, dtype=tf.bool)
