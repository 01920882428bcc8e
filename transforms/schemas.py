"""The Arrow schemas of the Parquet tables, built once (which tables a run writes: `transforms.tables`).

heatmaps     one row per (image, target): prediction, target, raw CAM, attention
class_stats  one row per class: counts, accuracy, mean CAM, attention, confusions
errors       one row per rejected record (or corrupt/empty shard), raw bytes kept
exemplars    the few worst images of each kind (flag, shortcut class, ...) with a thumbnail
clusters     one row per (class, strategy): SpRAy clusters of the class's maps
comparison   one row per class: what changed since a baseline run (pipeline/runs/compare.py)

Multi-label runs (`--label_format index|multi_hot`) write `heatmaps` and
`class_stats` with a few more columns, appended at the end
(MULTILABEL_HEATMAP_SCHEMA, MULTILABEL_CLASS_STATS_SCHEMA); a single-label
run's tables are exactly HEATMAP_SCHEMA and CLASS_STATS_SCHEMA.

Every table has a `run_id` column (the run's id, the same in every row; filled by the sink,
`transforms.sinks.WriteParquetTable`), so the tables of many runs can be queried together
(docs/querying.md): `<output>/run=*/class_stats/*.parquet`.

Schema version: `SCHEMA_VERSION` is written into every Parquet file's metadata
(`SCHEMA_VERSION_KEY`, `versioned`), the run manifest and the run's `runs.json` entry
("schema_version"). A run without one was written before the versions existed (version 0: no
`run_id` column). Bump it whenever a column changes meaning, type or disappears (adding a nullable
column at the end does not need it); readers (`pipeline.runs.manifest`) refuse, in one line, a run of a
version not in `KNOWN_SCHEMA_VERSIONS`.
"""

from __future__ import annotations

from typing import Optional

import pyarrow as pa

from transforms.errors import AuditError

# 0: before run_id and the version itself; 1: a run_id column in every table.
SCHEMA_VERSION = 1
KNOWN_SCHEMA_VERSIONS = (0, 1)
SCHEMA_VERSION_KEY = b"gradcam_audit_schema_version"

RUN_ID_FIELD = pa.field("run_id", pa.string(), nullable=False)

HEATMAP_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("record_index", pa.int64(), nullable=False),
        pa.field("record_offset", pa.int64()),
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
        pa.field("box_area", pa.float32()),
        pa.field("box_concentration", pa.float32()),
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
        # The class's strategy (SpRAy cluster) the map is nearest to (transforms/strategies.py).
        pa.field("cluster_id", pa.int32()),
        # Faithfulness of the rank-0 map on the sampled rows, null elsewhere
        # (transforms/cam/faithfulness.py): score drops, averaged over q.
        pa.field("faithfulness_morf", pa.float32()),
        pa.field("faithfulness_lerf", pa.float32()),
        pa.field("faithfulness_random", pa.float32()),
        pa.field("faithfulness_gap", pa.float32()),
        # The drops at each q of transforms.cam.faithfulness.FRACTIONS (0.1, 0.2, 0.3, 0.5).
        pa.field("deletion_morf", pa.list_(pa.float32())),
        pa.field("deletion_lerf", pa.list_(pa.float32())),
        pa.field("deletion_random", pa.list_(pa.float32())),
        # The run's id (the `run=<id>` folder's), the same in every row: tables of many runs read together.
        RUN_ID_FIELD,
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
        # Strategies (transforms/strategies.py): clusters of the class's maps.
        pa.field("num_strategies", pa.int32()),
        pa.field("suspicious_strategy", pa.bool_()),
        # Faithfulness over the class's sampled targeted rows (transforms/checks.py).
        pa.field("num_faithfulness", pa.int64()),
        pa.field("mean_faithfulness_morf", pa.float64()),
        pa.field("mean_faithfulness_lerf", pa.float64()),
        pa.field("mean_faithfulness_random", pa.float64()),
        pa.field("mean_faithfulness_gap", pa.float64()),
        pa.field("share_positive_gap", pa.float64()),
        pa.field("mean_deletion_morf", pa.list_(pa.float32())),
        pa.field("mean_deletion_lerf", pa.list_(pa.float32())),
        pa.field("mean_deletion_random", pa.list_(pa.float32())),
        # The run's id (the `run=<id>` folder's), the same in every row: tables of many runs read together.
        RUN_ID_FIELD,
    ]
)

CLUSTER_SCHEMA = pa.schema(
    [
        pa.field("class_id", pa.int64(), nullable=False),
        pa.field("cluster_id", pa.int32(), nullable=False),
        pa.field("size", pa.int64(), nullable=False),
        pa.field("share", pa.float64(), nullable=False),
        pa.field("mean_cam", pa.list_(pa.float32()), nullable=False),
        pa.field("cam_height", pa.int32(), nullable=False),
        pa.field("cam_width", pa.int32(), nullable=False),
        pa.field("mean_box_concentration", pa.float64()),
        pa.field("mean_box_mass", pa.float64()),
        pa.field("mean_border_mass", pa.float64()),
        pa.field("miss_share", pa.float64()),
        pa.field("peak_cell", pa.int32()),
        pa.field("exemplar_ids", pa.list_(pa.string()), nullable=False),
        pa.field("eigengap", pa.float64()),
        pa.field("suspicious", pa.bool_(), nullable=False),
        pa.field("reason", pa.string()),
        # The run's id (the `run=<id>` folder's), the same in every row: tables of many runs read together.
        RUN_ID_FIELD,
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
        # The run's id (the `run=<id>` folder's), the same in every row: tables of many runs read together.
        RUN_ID_FIELD,
    ]
)

EXEMPLAR_SCHEMA = pa.schema(
    [
        # What the images are exemplars of: "flag:<heatmap flag column>", "shortcut:<class_id>", or
        # any other "<family>:<...>" another step selects with transforms.exemplars.SelectExemplars.
        pa.field("kind", pa.string(), nullable=False),
        pa.field("rank", pa.int32(), nullable=False),  # 0 = the worst of its kind
        pa.field("score", pa.float64(), nullable=False),  # the ranking value, higher = worse
        pa.field("kind_total", pa.int64(), nullable=False),  # images of this kind in the whole run
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("record_index", pa.int64(), nullable=False),
        pa.field("label", pa.int64()),
        pa.field("predicted_class", pa.int64(), nullable=False),
        pa.field("predicted_score", pa.float32(), nullable=False),
        pa.field("target_class", pa.int64(), nullable=False),
        pa.field("box_mass", pa.float32()),
        pa.field("box_concentration", pa.float32()),
        pa.field("border_mass", pa.float32()),
        pa.field("peak_cell", pa.int32()),
        pa.field("cam", pa.list_(pa.float32()), nullable=False),
        pa.field("cam_height", pa.int32(), nullable=False),
        pa.field("cam_width", pa.int32(), nullable=False),
        # JPEG, longest side transforms.thumbnails.TILE px: the image with the CAM overlaid and its boxes
        # drawn (the CAM alone on grey when the image could not be decoded).
        pa.field("thumbnail", pa.binary(), nullable=False),
        # The run's id (the `run=<id>` folder's), the same in every row: tables of many runs read together.
        RUN_ID_FIELD,
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
        pa.field("faithfulness_gap_change", pa.float64()),
        pa.field("baseline_shortcut", pa.bool_()),
        pa.field("current_shortcut", pa.bool_()),
        pa.field("flagged", pa.bool_(), nullable=False),
        pa.field("reasons", pa.list_(pa.string()), nullable=False),
        # The run's id (the `run=<id>` folder's), the same in every row: tables of many runs read together.
        RUN_ID_FIELD,
    ]
)

# Multi-label runs only (README "Multi-label"): appended to the heatmaps and class_stats schemas.
MULTILABEL_HEATMAP_FIELDS = [
    pa.field("labels", pa.list_(pa.int64())),  # the image's true classes; null without the label feature
    pa.field("target_is_label", pa.bool_()),  # target_class is one of them; null without labels
    pa.field("predicted_labels", pa.list_(pa.int64())),  # classes scoring >= the threshold
    pa.field("scores", pa.list_(pa.float32())),  # every class's score, on the image's rank-0 row only
]
MULTILABEL_CLASS_STATS_FIELDS = [
    pa.field("threshold", pa.float64(), nullable=False),  # a class is predicted when its score is >= this
    pa.field("support", pa.int64(), nullable=False),  # images with the class among their labels
    pa.field("recall", pa.float64()),  # true positives / support
    pa.field("f1", pa.float64()),  # 2 precision recall / (precision + recall)
    pa.field("mean_score", pa.float64()),  # the class's mean score over every explained image
]
MULTILABEL_HEATMAP_SCHEMA = pa.schema([*HEATMAP_SCHEMA, *MULTILABEL_HEATMAP_FIELDS])
MULTILABEL_CLASS_STATS_SCHEMA = pa.schema([*CLASS_STATS_SCHEMA, *MULTILABEL_CLASS_STATS_FIELDS])


def heatmap_schema(multilabel: bool = False) -> pa.Schema:
    return MULTILABEL_HEATMAP_SCHEMA if multilabel else HEATMAP_SCHEMA


def class_stats_schema(multilabel: bool = False) -> pa.Schema:
    return MULTILABEL_CLASS_STATS_SCHEMA if multilabel else CLASS_STATS_SCHEMA


# Stages a record can be rejected at, in pipeline order. "read" rows describe
# a shard (corrupt tail, empty shard), not one record.
STAGES = ("read", "decode", "compute")


def versioned(schema: pa.Schema) -> pa.Schema:
    """`schema` with the schema version in its metadata (what the Parquet writers write)."""
    return schema.with_metadata({**(schema.metadata or {}), SCHEMA_VERSION_KEY: str(SCHEMA_VERSION).encode()})


def version_of(metadata: Optional[dict]) -> object:
    """The schema version a Parquet file's Arrow schema metadata records (0 when it records none)."""
    raw = (metadata or {}).get(SCHEMA_VERSION_KEY)
    if raw is None:
        return 0
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    return int(text) if text.strip().isdigit() else text


def check_schema_version(version, where: str):
    """Returns `version` if this release reads it; AuditError (one line) otherwise."""
    if version is None:
        version = 0
    if isinstance(version, str) and version.strip().isdigit():
        version = int(version)
    if version not in KNOWN_SCHEMA_VERSIONS:
        raise AuditError(
            f"{where}: written with table schema version {version!r}; this release of gradcam-audit reads "
            f"versions {', '.join(map(str, KNOWN_SCHEMA_VERSIONS))}: read it with the release that wrote it "
            f"(see the run's run_manifest.json, \"versions\") or a newer one")
    return version
