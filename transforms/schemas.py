"""The Arrow schemas of the three Parquet tables, built once.

heatmaps     one row per (image, target): prediction, target, raw CAM, attention
class_stats  one row per class: counts, accuracy, mean CAM, attention, confusions
errors       one row per rejected record (or corrupt/empty shard), raw bytes kept
comparison   one row per class: what changed since a baseline run (pipeline/compare.py)
"""

import pyarrow as pa

HEATMAP_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("record_index", pa.int64(), nullable=False),
        pa.field("label", pa.int64()),
        pa.field("predicted_class", pa.int64(), nullable=False),
        pa.field("predicted_score", pa.float32(), nullable=False),
        pa.field("target_rank", pa.int32(), nullable=False),
        pa.field("target_class", pa.int64(), nullable=False),
        pa.field("target_score", pa.float32(), nullable=False),
        pa.field("target_logit", pa.float32(), nullable=False),
        pa.field("method", pa.string(), nullable=False),
        pa.field("target_layer", pa.string(), nullable=False),
        pa.field("cam", pa.list_(pa.float32()), nullable=False),
        pa.field("cam_height", pa.int32(), nullable=False),
        pa.field("cam_width", pa.int32(), nullable=False),
        pa.field("cam_max", pa.float32(), nullable=False),
        pa.field("peak_y", pa.float32()),
        pa.field("peak_x", pa.float32()),
        pa.field("entropy", pa.float32()),
        pa.field("border_mass", pa.float32()),
        pa.field("box_mass", pa.float32()),
        pa.field("peak_in_box", pa.bool_()),
        pa.field("num_boxes", pa.int32(), nullable=False),
        pa.field("image_height", pa.int32(), nullable=False),
        pa.field("image_width", pa.int32(), nullable=False),
        # Audit flags (transforms/flags.py documents each and its threshold).
        pa.field("confident_wrong", pa.bool_()),
        pa.field("low_confidence", pa.bool_()),
        pa.field("attention_outside_box", pa.bool_()),
        pa.field("attention_on_border", pa.bool_()),
        pa.field("peak_cell", pa.int32()),
        pa.field("box_cell", pa.int32()),
    ]
)

CONFUSION_TYPE = pa.struct([pa.field("predicted_class", pa.int64()), pa.field("count", pa.int64())])

CLASS_STATS_SCHEMA = pa.schema(
    [
        pa.field("class_id", pa.int64(), nullable=False),
        pa.field("class_name", pa.string()),
        pa.field("num_labelled", pa.int64(), nullable=False),
        pa.field("num_predicted", pa.int64(), nullable=False),
        pa.field("num_correct", pa.int64(), nullable=False),
        pa.field("accuracy", pa.float64()),
        pa.field("precision", pa.float64()),
        pa.field("mean_predicted_score", pa.float64()),
        pa.field("num_targeted", pa.int64(), nullable=False),
        pa.field("mean_target_score", pa.float64()),
        pa.field("mean_cam", pa.list_(pa.float32())),
        pa.field("cam_height", pa.int32()),
        pa.field("cam_width", pa.int32()),
        pa.field("mean_peak_y", pa.float64()),
        pa.field("mean_peak_x", pa.float64()),
        pa.field("mean_entropy", pa.float64()),
        pa.field("mean_border_mass", pa.float64()),
        pa.field("mean_box_mass", pa.float64()),
        pa.field("pointing_accuracy", pa.float64()),
        pa.field("top_confusions", pa.list_(CONFUSION_TYPE)),
        # Audit flags over the class's targeted rows (transforms/flags.py).
        pa.field("share_confident_wrong", pa.float64()),
        pa.field("share_low_confidence", pa.float64()),
        pa.field("share_attention_outside_box", pa.float64()),
        pa.field("share_attention_on_border", pa.float64()),
        pa.field("share_flagged", pa.float64()),
        pa.field("peak_cell", pa.int32()),
        pa.field("peak_cell_share", pa.float64()),
        pa.field("box_cell_share", pa.float64()),
        pa.field("shortcut_score", pa.float64()),
        pa.field("shortcut", pa.bool_()),
    ]
)

ERROR_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string(), nullable=False),
        pa.field("record_index", pa.int64()),
        pa.field("image_id", pa.string()),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("error", pa.string(), nullable=False),
        pa.field("message", pa.string(), nullable=False),
        # The record's bytes; for a CorruptRecord span (stage "read") its first
        # transforms.records.RAW_RECORD_CAP bytes (1 MiB), offset and length in "message".
        pa.field("raw_record", pa.binary()),
    ]
)

COMPARISON_SCHEMA = pa.schema(
    [
        pa.field("class_id", pa.int64(), nullable=False),
        pa.field("class_name", pa.string()),
        pa.field("baseline_images", pa.int64()),
        pa.field("current_images", pa.int64()),
        pa.field("images_change", pa.float64()),
        pa.field("baseline_accuracy", pa.float64()),
        pa.field("current_accuracy", pa.float64()),
        pa.field("accuracy_change", pa.float64()),
        pa.field("baseline_mean_score", pa.float64()),
        pa.field("current_mean_score", pa.float64()),
        pa.field("mean_score_change", pa.float64()),
        pa.field("cam_correlation", pa.float64()),
        pa.field("peak_shift", pa.float64()),
        pa.field("border_mass_change", pa.float64()),
        pa.field("box_mass_change", pa.float64()),
        pa.field("pointing_accuracy_change", pa.float64()),
        pa.field("share_flagged_change", pa.float64()),
        pa.field("baseline_shortcut", pa.bool_()),
        pa.field("current_shortcut", pa.bool_()),
        pa.field("flagged", pa.bool_(), nullable=False),
        pa.field("reasons", pa.list_(pa.string()), nullable=False),
    ]
)

# Stages a record can be rejected at, in pipeline order. "read" rows describe
# a shard (corrupt tail, empty shard), not one record.
STAGES = ("read", "decode", "compute")
