"""The model's strategies per class: Spectral Relevance Analysis (SpRAy) in the job.

SpRAy (Lapuschkin et al., "Unmasking Clever Hans predictors and assessing
what machines really learn", Nature Communications 10:1096, 2019) clusters
a class's explanation maps: each cluster is one *strategy* of the model for
that class (e.g. "looks at the object", "looks at a watermark in the top-right
corner"), and a cluster that looks off the objects is a suspect.

`FindStrategies` (a composite PTransform) does it with bounded cost:

    Arrow batches of heatmap rows (the job's BatchRows: FormatHeatmapRows' batches gathered to 512 rows)
      --SampleBatchMaps (max-normalised maps, image-id hash priorities)--> (class, maps of a batch)
      --SampleMapsPerClass (SampleMapsFn: the sample_size highest priorities)--> (class, [maps])
      --ClusterClassMaps--> (class, ClassStrategies: cluster means, eigengap)
    Arrow batches --AssignStrategies (side input: the cluster means,
      numpy over each batch)--> batches + cluster_id (the heatmaps table)
      --CombinePerCluster (each batch's members pre-summed)--> one `clusters` row per (class, cluster)

Clustering (`cluster_maps`): a symmetric k-nearest-neighbour connectivity
graph of the maps (what `sklearn.cluster.SpectralClustering(affinity=
"nearest_neighbors")` builds), the eigenvalues of its normalised graph
Laplacian (scipy), the number of clusters k where the gap between eigenvalue
k and k+1 is the largest (k <= max_clusters; the *eigengap* heuristic), and
the clusters from scikit-learn's `SpectralClustering` on that graph. Every
row of the class (not only the sample) then goes to its nearest cluster mean
(Euclidean, max-normalised maps): the int32 `cluster_id` of `heatmaps`.
Maps of one class have one size within a run; a sample mixing sizes keeps
the most common size, and rows of another size get no cluster_id.

The `suspicious` rule (per cluster; thresholds in `StrategySettings`):

  A cluster is suspicious when it holds at least `min_share` (5%) of the
  class's rows and at least `min_rows` (5) rows, and
  - with boxes (the cluster's rows have object boxes), judged by where its
    members look relative to their *own* boxes:
    * most of them look elsewhere: the share of members whose peak misses
      every box of its image by more than the pointing-game tolerance
      (`peak_in_box` False, as the pointing game counts; --pointing_tolerance)
      is at least `min_miss_share` (0.5), and most of their maps' mass lies
      outside the boxes: mean box_mass below `max_box_mass` (0.5); or
    * whatever the peaks, its mean box_concentration (box_mass / box_area per
      row; a flat map: 1.0) is at most `max_concentration` (0.9): clearly less
      mass on the objects than a flat map gives them.
    Why not the concentration alone: a strategy that looks at a corner marker
    while the object still draws some of the mass averages anywhere from 0.6
    to 2.8 (demo models trained with other seeds and on other CPUs), where
    diffuse and object-bound strategies also sit; where the peaks land does
    not move with the CPU (corner strategies miss their own boxes on 52-100%
    of their members in 39 of 40 clusters over ten demo models, the circle
    and square strategies on 0-40%; bench/demo_seeds.py);
  - without boxes: its mean border mass is at least `border_mass` (0.6, the
    per-image border flag's threshold), or it is a minority strategy (share
    at most 0.5) whose mean map correlates less than `min_correlation` (0.2)
    with the mean map of the class's other rows: it looks where the class's
    other strategies do not.
  `reason` says which, with the numbers. The clusters table keeps each
  cluster's `miss_share` and `mean_box_mass` (None without boxes).

A class's `num_strategies` is its number of clusters and
`suspicious_strategy` whether any is suspicious (class_stats columns).
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import logging
import warnings
from typing import Iterable, Optional

import apache_beam as beam
import numpy as np
import pyarrow as pa

from transforms.arrow_columns import cam_matrix, numpy_column
from transforms.attention import correlation
from transforms.checks import id_hash
from transforms.exemplars import PER_KIND, ROW_FIELDS, Candidate, strategy_kind
from transforms.flags import CELL_NAMES, NUM_CELLS
from transforms.schemas import HEATMAP_SCHEMA
from transforms.settings import option
from transforms.sinks import ToRecordBatches

_LOG = logging.getLogger(__name__)

MEMBERS_TAG = "members"
EXEMPLAR_CANDIDATES_TAG = "exemplar_candidates"
EXEMPLARS = 6
BATCH_ROWS = 512  # heatmap rows per Arrow batch between the explaining stage and the assignment
# The heatmaps columns AssignStrategies reads (and cluster_id, which it writes).
ASSIGN_COLUMNS = ("image_id", "target_class", "cam", "cam_height", "cam_width", "cam_max", "box_concentration",
                  "box_mass", "border_mass", "peak_cell", "peak_in_box", "cluster_id")


@dataclasses.dataclass(frozen=True)
class StrategySettings:
    """How strategies are found and when one is suspicious (module docstring); the `option` fields are
    also the options `--strategy_<field>` of `python -m pipeline` (`transforms/settings.py`)."""

    sample_size: int = option(
        1000, "Strategies (SpRAy): maps sampled per class for the spectral clustering (uniformly over image "
        "ids: the highest id hashes, so the same images every run)", kind="positive")
    max_clusters: int = option(
        8, "Strategies: at most this many clusters per class (the eigengap picks the number)", kind="positive")
    neighbors: int = 10
    min_sample: int = 20
    eigengap_floor: float = 0.01
    min_share: float = option(
        0.05, "Strategies: a cluster with at least this share of its class can be suspicious", kind="non_negative")
    min_rows: int = 5
    max_concentration: float = option(
        0.9, "Strategies: a cluster whose mean box_concentration is at most this looks off the objects "
        "(1 = a flat map)", kind="non_negative")
    min_miss_share: float = option(
        0.5, "Strategies: a cluster of boxed images is also suspicious when at least this share of its members "
        "peak off their own boxes (pointing game, --pointing_tolerance) and ...", kind="share")
    max_box_mass: float = option(
        0.5, "... their maps' mean box_mass (share of the mass inside the boxes) is below this", kind="share")
    border_mass: float = 0.6
    min_correlation: float = 0.2
    exemplars: int = EXEMPLARS
    seed: int = 0


DEFAULT_SETTINGS = StrategySettings()


@dataclasses.dataclass
class ClassStrategies:
    """One class's clusters: their mean maps [k, h*w] and how they were found."""

    shape: tuple[int, int]
    means: np.ndarray
    eigengap: Optional[float]
    num_sampled: int


def normalised_map(row: dict) -> Optional[np.ndarray]:
    """The row's CAM divided by its maximum, flattened (float32); None without mass."""
    if not row.get("cam_max") or row["cam_max"] <= 0:
        return None
    return np.asarray(row["cam"], np.float32) / np.float32(row["cam_max"])


def eigengap_clusters(affinity, max_clusters: int, floor: float = 0.01) -> tuple[int, float, np.ndarray]:
    """(k, gap, eigenvalues): the eigengap heuristic on a symmetric affinity matrix.

    The eigenvalues 0 = l_1 <= l_2 <= ... of the normalised graph Laplacian
    (scipy.sparse.csgraph.laplacian; the smallest max_clusters + 1 by
    scipy.sparse.linalg.eigsh, dense numpy for tiny graphs); k groups with no
    edges between them give k zero eigenvalues, then a jump. The gap is read
    on a log scale, k = argmax over k = 1..max_clusters of
    log(l_{k+1} + floor) - log(l_k + floor): the largest *relative* jump.
    The plain difference l_{k+1} - l_k fails on maps that vary smoothly within
    a group (an object at random positions): such a group's own spectrum
    rises in steps of similar size (measured: one group of jittered blobs,
    gaps 0.027, 0.002, 0.036, ...). The floor keeps the near-zero eigenvalues
    of nearly disconnected groups (0.001 vs 0.002) from making a huge ratio.
    Returns gap = l_{k+1} - l_k of the chosen k (the `eigengap` column).
    """
    import scipy.sparse
    from scipy.sparse.csgraph import laplacian
    from scipy.sparse.linalg import ArpackError, eigsh

    lap = scipy.sparse.csr_matrix(laplacian(scipy.sparse.csr_matrix(affinity, dtype=np.float64), normed=True))
    n = lap.shape[0]
    top = min(max_clusters + 1, n - 1)
    values = None
    if n > 4 * (top + 1):  # the smallest of L are the largest of I - L: Lanczos (ARPACK) on the sparse graph
        shifted = scipy.sparse.identity(n, format="csr") - lap
        start = np.random.default_rng(0).uniform(-1.0, 1.0, n)  # a fixed start: the same clusters every run
        try:  # ~0.2 s for 1000 maps
            values = np.sort(1.0 - eigsh(shifted, k=top, which="LA", v0=start, return_eigenvectors=False))
        except ArpackError as exc:  # ArpackNoConvergence too; seen: "error 3: No shifts could be applied"
            _LOG.warning("ARPACK failed on %d maps (%s); computing the spectrum densely", n, exc)
    if values is None:  # tiny graphs, or ARPACK failed: every eigenvalue, dense (~0.5 s for 1000 maps)
        values = np.linalg.eigvalsh(lap.toarray())[:top]
    values = np.clip(values, 0.0, None)
    relative = np.diff(np.log(values + floor))
    k = int(np.argmax(relative)) + 1
    return k, float(values[k] - values[k - 1]), values


def cluster_maps(maps: np.ndarray, settings: StrategySettings = DEFAULT_SETTINGS) -> tuple[np.ndarray, Optional[float]]:
    """SpRAy on one class's sample: (labels [n] in 0..k-1, eigengap or None).

    Args:
      maps: [n, h*w] max-normalised maps.
    """
    from sklearn.cluster import SpectralClustering
    from sklearn.neighbors import kneighbors_graph

    n = len(maps)
    if n < max(settings.min_sample, 3):
        return np.zeros(n, np.int64), None
    neighbors = min(settings.neighbors, n - 1)
    connectivity = kneighbors_graph(maps, n_neighbors=neighbors, include_self=True)
    affinity = 0.5 * (connectivity + connectivity.T)  # as SpectralClustering(affinity="nearest_neighbors")
    k, gap, _ = eigengap_clusters(affinity, settings.max_clusters, settings.eigengap_floor)
    if k == 1:
        return np.zeros(n, np.int64), gap
    # (sklearn's spectral embedding falls back to LOBPCG itself when ARPACK fails.)
    with warnings.catch_warnings():  # separate strategies are what we look for: a disconnected graph is expected
        warnings.filterwarnings("ignore", message="Graph is not fully connected")
        labels = SpectralClustering(
            n_clusters=k, affinity="precomputed", assign_labels="cluster_qr", random_state=settings.seed
        ).fit_predict(affinity)
    return np.asarray(labels, np.int64), gap


def strategies_of(
    items: Iterable[tuple[tuple[int, int], np.ndarray]], settings: StrategySettings = DEFAULT_SETTINGS
) -> ClassStrategies:
    """ClassStrategies from a sample of (shape, max-normalised map) of one class."""
    items = list(items)
    shape = collections.Counter(s for s, _ in items).most_common(1)[0][0]
    maps = np.stack([m for s, m in items if s == shape]).astype(np.float64)
    labels, gap = cluster_maps(maps, settings)
    # Clusters renumbered by size (0 = the largest), so ids read the same way in every class.
    order = [c for c, _ in collections.Counter(labels.tolist()).most_common()]
    means = np.stack([maps[labels == c].mean(axis=0) for c in order]).astype(np.float32)
    return ClassStrategies(shape=tuple(shape), means=means, eigengap=gap, num_sampled=len(maps))


class SampleMapsFn(beam.CombineFn):
    """A uniform sample of up to `n` max-normalised maps per class, from batches' parts.

    Each map gets a priority where it is made (`SampleBatchMaps`: its id's hash) and the `n` highest
    priorities are kept, which merges in any order into a uniform sample of all the class's maps
    (Beam's `Sample.FixedSizePerKey` does the same one element at a time). A part and the
    accumulator hold float32 matrices: {(h, w): (priorities [m], maps [m, h*w])}, one pickled
    buffer each instead of a pickled array per map.
    """

    def __init__(self, n: int):
        self._n = n

    def create_accumulator(self) -> dict:
        return {}

    def add_input(self, acc: dict, part: dict) -> dict:
        for shape, (priorities, maps) in part.items():
            self._add(acc, shape, priorities, maps)
        return acc

    def merge_accumulators(self, accumulators) -> dict:
        merged: dict = {}
        for acc in accumulators:
            self.add_input(merged, acc)
        return merged

    def _add(self, acc: dict, shape, priorities: np.ndarray, maps: np.ndarray) -> None:
        if shape in acc:
            priorities = np.concatenate([acc[shape][0], priorities])
            maps = np.concatenate([acc[shape][1], maps])
        if len(priorities) > self._n:
            keep = np.argpartition(-priorities, self._n - 1)[: self._n]
            priorities, maps = priorities[keep], maps[keep]
        acc[shape] = (priorities, maps)

    def extract_output(self, acc: dict) -> list[tuple[tuple[int, int], np.ndarray]]:
        """[(shape, map)]: the n highest priorities over every map size (what `strategies_of` takes)."""
        items = [(float(p), shape, m) for shape, (priorities, maps) in acc.items()
                 for p, m in zip(priorities.tolist(), maps, strict=True)]
        items.sort(key=lambda item: -item[0])
        return [(shape, m) for _, shape, m in items[: self._n]]


class SampleBatchMaps(beam.DoFn):
    """Arrow batch of heatmap rows -> (class, {(h, w): (priorities, maps)}): each row with CAM mass
    as its max-normalised map (`normalised_map`, float32) with its image id's hash as priority; per
    class and map size at most `n` of a batch go on (those of the highest priorities: the sample keeps
    no others).

    The priority is a hash of the image id (`faithfulness.id_hash`), so a class's sample is the same
    images on every run of the same data however Beam batches it, and the strategies found are too
    (a nightly comparison sees the model change, not the draw); over ids it is a uniform sample.
    """

    def __init__(self, n: int, salt: str = ""):
        self._n = n
        self._salt = salt  # tests only: another uniform draw of the same ids

    def _priorities(self, batch, rows: np.ndarray) -> np.ndarray:
        ids = batch.column("image_id").take(pa.array(rows, pa.int64())).to_pylist()
        return np.array([id_hash(self._salt + image_id)[0] for image_id in ids], dtype=np.float64)

    def process(self, batch):
        cam_max = numpy_column(batch, "cam_max", np.float32)
        rows = np.flatnonzero(cam_max > 0)
        if not len(rows):
            return
        keys = np.stack([numpy_column(batch, name, np.int64)[rows]
                         for name in ("target_class", "cam_height", "cam_width")], axis=1)
        groups, inverse = np.unique(keys, axis=0, return_inverse=True)
        inverse = inverse.reshape(-1)
        priorities = self._priorities(batch, rows)
        order = np.argsort(inverse, kind="stable")
        bounds = np.searchsorted(inverse[order], np.arange(len(groups) + 1))
        for g, (class_id, height, width) in enumerate(groups.tolist()):
            members = order[bounds[g] : bounds[g + 1]]
            if len(members) > self._n:
                members = members[np.argpartition(-priorities[members], self._n - 1)[: self._n]]
            picked = rows[members]
            maps = cam_matrix(batch, picked, height * width) / cam_max[picked, None]
            yield class_id, {(height, width): (priorities[members], maps)}


def _row_fields(batch, rows: np.ndarray) -> list[dict]:
    """The exemplar `ROW_FIELDS` of `rows` of an Arrow batch, as `exemplars.candidate_from_row` takes them from a row dict."""
    names = [f for f in ROW_FIELDS if f in batch.schema.names]
    found = batch.take(pa.array(rows, pa.int64())).select(names).to_pylist()
    return [{f: row.get(f) for f in ROW_FIELDS} for row in found]


def _known_sum(values: np.ndarray) -> tuple[float, int]:
    """(sum, count) of the values that are not NaN (NaN: the column was null)."""
    known = ~np.isnan(values)
    return float(values[known].sum()), int(known.sum())


def _members(vectors: np.ndarray, distances: np.ndarray, image_ids: list, concentration: np.ndarray,
             box_mass: np.ndarray, border: np.ndarray, cells: np.ndarray, hits: np.ndarray,
             exemplars: int) -> "_ClusterAccumulator":
    """One batch's members of one (class, cluster) as a partial `ClusterStatsFn` accumulator.

    hits: `peak_in_box` as 1.0 / 0.0, NaN where the row has no box.
    """
    acc = _ClusterAccumulator(count=len(vectors), sum_map=vectors.astype(np.float64).sum(axis=0))
    acc.sum_concentration, acc.num_concentration = _known_sum(concentration)
    acc.sum_box_mass, acc.num_box_mass = _known_sum(box_mass)
    acc.sum_border, acc.num_border = _known_sum(border)
    pointed_hits, acc.num_pointed = _known_sum(hits)
    acc.misses = acc.num_pointed - int(pointed_hits)
    acc.peak_cells = np.bincount(cells[cells >= 0], minlength=NUM_CELLS).astype(np.int64)
    acc.closest = heapq.nlargest(exemplars, zip((-distances).tolist(), image_ids, strict=True))
    heapq.heapify(acc.closest)
    return acc


class AssignStrategies(beam.DoFn):
    """A batch of heatmap rows (Arrow RecordBatch) -> the batch with `cluster_id`, per (class, cluster)
    its members as a partial `ClusterStatsFn` accumulator (MEMBERS_TAG), and its `per_kind` rows
    closest to the cluster's mean as strategy exemplar candidates (EXEMPLAR_CANDIDATES_TAG; the
    first carries the count of the batch's rows of that kind).

    All per-row work is numpy over the batch: a row goes to its nearest cluster mean as it would
    on its own (same float32 distances; nearest, the first on ties: `tests/test_strategies.py::assign_one`).
    """

    def __init__(self, exemplars: int = EXEMPLARS, per_kind: int = PER_KIND):
        self._exemplars = exemplars
        self._per_kind = per_kind

    def process(self, batch, models: dict):
        n = batch.num_rows
        cluster_ids = np.full(n, -1, np.int32)
        if n and models:
            classes = numpy_column(batch, "target_class", np.int64)
            cam_max = numpy_column(batch, "cam_max")
            shapes = np.stack([numpy_column(batch, "cam_height", np.int64), numpy_column(batch, "cam_width", np.int64)], 1)
            # The members' statistics in `_members`' argument order, read from the batch once (not per class).
            stats = (numpy_column(batch, "box_concentration"), numpy_column(batch, "box_mass"),
                     numpy_column(batch, "border_mass"),
                     numpy_column(batch, "peak_cell", np.int64), numpy_column(batch, "peak_in_box"))
            for class_id in np.unique(classes).tolist():
                model = models.get(class_id)
                if model is None:
                    continue
                rows = np.flatnonzero((classes == class_id) & (cam_max > 0) & np.all(shapes == model.shape, axis=1))
                if not len(rows):
                    continue
                vectors = cam_matrix(batch, rows, model.shape[0] * model.shape[1])
                vectors = vectors / cam_max[rows].astype(np.float32)[:, None]
                distances = np.linalg.norm(model.means[None, :, :] - vectors[:, None, :], axis=2)
                nearest = np.argmin(distances, axis=1)
                cluster_ids[rows] = nearest
                yield from self._cluster_outputs(batch, class_id, rows, vectors, distances[np.arange(len(rows)), nearest],
                                                 nearest, [column[rows] for column in stats])
        column = pa.array(cluster_ids, pa.int32(), mask=cluster_ids < 0)
        index = batch.schema.get_field_index("cluster_id")
        yield pa.RecordBatch.from_arrays(
            [column if i == index else batch.column(i) for i in range(batch.num_columns)], schema=batch.schema)

    def _cluster_outputs(self, batch, class_id, rows, vectors, distances, nearest, stats):
        image_ids = batch.column("image_id").take(rows).to_pylist()
        for cluster in np.unique(nearest).tolist():
            mine = np.flatnonzero(nearest == cluster)
            ids = [image_ids[i] for i in mine]
            yield beam.pvalue.TaggedOutput(MEMBERS_TAG, ((class_id, cluster), _members(
                vectors[mine], distances[mine], ids, *(column[mine] for column in stats), self._exemplars)))
            # The closest rows as exemplars of their strategy (ties to the smallest image id); the winners'
            # records are read again only at the end. The first stands for the batch's count of the kind.
            best = sorted(range(len(mine)), key=lambda i: (distances[mine[i]], ids[i]))[: self._per_kind]
            fields = _row_fields(batch, rows[mine[best]])
            kind = strategy_kind(class_id, cluster)
            for j, (i, row) in enumerate(zip(best, fields, strict=True)):
                yield beam.pvalue.TaggedOutput(EXEMPLAR_CANDIDATES_TAG, (kind, Candidate(
                    -float(distances[mine[i]]), ids[i], row, b"", (), len(mine) - len(best) + 1 if j == 0 else 1)))


@dataclasses.dataclass
class _ClusterAccumulator:
    count: int = 0
    sum_map: Optional[np.ndarray] = None
    sum_concentration: float = 0.0
    num_concentration: int = 0
    sum_box_mass: float = 0.0
    num_box_mass: int = 0
    sum_border: float = 0.0
    num_border: int = 0
    misses: int = 0  # members whose peak misses every box of their image (pointing game)
    num_pointed: int = 0  # members with boxes
    peak_cells: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(NUM_CELLS, np.int64))
    closest: list = dataclasses.field(default_factory=list)  # [(-distance, image_id)], a max-heap of the n closest


class ClusterStatsFn(beam.CombineFn):
    """Members of one (class, cluster) -> size, mean map, mean statistics, the exemplars closest to the mean."""

    def __init__(self, exemplars: int = EXEMPLARS):
        super().__init__()
        self._n = exemplars

    def create_accumulator(self) -> _ClusterAccumulator:
        return _ClusterAccumulator()

    def _keep(self, acc: _ClusterAccumulator, distance: float, image_id: str) -> None:
        item = (-distance, image_id)
        if len(acc.closest) < self._n:
            heapq.heappush(acc.closest, item)
        elif item > acc.closest[0]:
            heapq.heapreplace(acc.closest, item)

    def add_input(self, acc: _ClusterAccumulator, members: _ClusterAccumulator) -> _ClusterAccumulator:
        """`members`: a batch's members of the cluster, already summed (`AssignStrategies`)."""
        return self.merge_accumulators([acc, members])

    def merge_accumulators(self, accumulators) -> _ClusterAccumulator:
        merged = _ClusterAccumulator()
        for acc in accumulators:
            merged.count += acc.count
            if acc.sum_map is not None:
                merged.sum_map = acc.sum_map.copy() if merged.sum_map is None else merged.sum_map + acc.sum_map
            merged.sum_concentration += acc.sum_concentration
            merged.num_concentration += acc.num_concentration
            merged.sum_box_mass += acc.sum_box_mass
            merged.num_box_mass += acc.num_box_mass
            merged.sum_border += acc.sum_border
            merged.num_border += acc.num_border
            merged.misses += acc.misses
            merged.num_pointed += acc.num_pointed
            merged.peak_cells = merged.peak_cells + acc.peak_cells
            for neg, image_id in acc.closest:
                self._keep(merged, -neg, image_id)
        return merged

    def extract_output(self, acc: _ClusterAccumulator) -> dict:
        return {
            "size": acc.count,
            "mean_map": None if acc.sum_map is None else (acc.sum_map / acc.count).astype(np.float32),
            "mean_box_concentration": acc.sum_concentration / acc.num_concentration if acc.num_concentration else None,
            "mean_box_mass": acc.sum_box_mass / acc.num_box_mass if acc.num_box_mass else None,
            "mean_border_mass": acc.sum_border / acc.num_border if acc.num_border else None,
            "miss_share": acc.misses / acc.num_pointed if acc.num_pointed else None,
            "peak_cell": int(acc.peak_cells.argmax()) if acc.peak_cells.sum() else None,
            "exemplar_ids": [image_id for _, image_id in sorted(acc.closest, key=lambda t: (-t[0], t[1]))],
        }


def suspicion(cluster: dict, others_map: Optional[np.ndarray], settings: StrategySettings) -> tuple[bool, Optional[str]]:
    """(suspicious, reason) of one cluster (see the module docstring for the rule)."""
    s = settings
    share, size = cluster["share"], cluster["size"]
    if share < s.min_share or size < s.min_rows:
        return False, None
    where = "" if cluster["peak_cell"] is None else f", peaks mostly {CELL_NAMES[cluster['peak_cell']]}"
    concentration = cluster["mean_box_concentration"]
    if concentration is not None:
        misses, box_mass = cluster.get("miss_share"), cluster.get("mean_box_mass")
        if misses is not None and box_mass is not None and misses >= s.min_miss_share and box_mass < s.max_box_mass:
            return True, (
                f"{share:.0%} of the class ({size} maps) look off the objects: {misses:.0%} of them peak off "
                f"their own boxes (limit {s.min_miss_share:.0%}), {1 - box_mass:.0%} of the mass lies outside "
                f"the boxes (limit {1 - s.max_box_mass:.0%}){where}"
            )
        if concentration <= s.max_concentration:
            return True, (
                f"{share:.0%} of the class ({size} maps) look off the objects: in-box concentration "
                f"{concentration:.2f} (a flat map: 1; limit {s.max_concentration:.2f}){where}"
            )
        return False, None
    border = cluster["mean_border_mass"]
    if border is not None and border >= s.border_mass:
        return True, f"{share:.0%} of the class ({size} maps) look at the border: mass {border:.2f}{where}"
    if others_map is not None and share <= 0.5:
        corr = correlation(np.asarray(cluster["mean_cam"], np.float64), others_map)
        if corr is not None and corr < s.min_correlation:
            return True, (
                f"{share:.0%} of the class ({size} maps) look where its other strategies do not: "
                f"correlation {corr:.2f} with the rest (limit {s.min_correlation:.2f}){where}"
            )
    return False, None


def cluster_rows(class_id: int, clusters: list[tuple[int, dict]], model: Optional[ClassStrategies],
                 settings: StrategySettings = DEFAULT_SETTINGS) -> list[dict]:
    """The `clusters` table rows of one class from its per-cluster stats."""
    total = sum(stats["size"] for _, stats in clusters)
    rows = []
    for cluster_id, stats in sorted(clusters, key=lambda kv: kv[0]):
        h, w = model.shape if model is not None else (0, 0)
        rows.append({
            "class_id": class_id,
            "cluster_id": cluster_id,
            "size": stats["size"],
            "share": stats["size"] / total,
            "mean_cam": stats["mean_map"].tolist(),
            "cam_height": h,
            "cam_width": w,
            "mean_box_concentration": stats["mean_box_concentration"],
            "mean_box_mass": stats.get("mean_box_mass"),
            "mean_border_mass": stats["mean_border_mass"],
            "miss_share": stats.get("miss_share"),
            "peak_cell": stats["peak_cell"],
            "exemplar_ids": stats["exemplar_ids"],
            "eigengap": None if model is None else model.eigengap,
            "suspicious": False,
            "reason": None,
        })
    for row, (_, stats) in zip(rows, sorted(clusters, key=lambda kv: kv[0]), strict=True):
        rest = [(s["mean_map"].astype(np.float64) * s["size"]) for c, s in clusters if c != row["cluster_id"]]
        others = np.sum(rest, axis=0) / (total - stats["size"]) if rest else None
        row["suspicious"], row["reason"] = suspicion(row, others, settings)
    return rows


class FindStrategies(beam.PTransform):
    """PCollection[heatmap row] -> {"heatmaps": Arrow RecordBatches of the rows with cluster_id (`schema`),
    "clusters": clusters rows, "models": (class, ClassStrategies), "exemplar_candidates": (strategy kind,
    exemplars.Candidate), each batch's closest rows of each strategy, without record bytes}.

    The rows wait for the cluster means (a side input made from all of them), so they cross a stage
    boundary: they cross as Arrow batches of `batch_rows` rows (one pickled buffer each, not a pickled
    dict per row), the sampling and the assignment are numpy over a batch, and the heatmaps table is
    written from them. With `batched`, the input already is such batches (the job's BatchRows gathers
    FormatHeatmapRows' batches into them, for this and for the class statistics).
    """

    def __init__(self, settings: StrategySettings = DEFAULT_SETTINGS, schema=None, batch_rows: int = BATCH_ROWS,
                 batched: bool = False):
        super().__init__()
        self._settings = settings
        self._schema = schema if schema is not None else HEATMAP_SCHEMA
        self._batch_rows = batch_rows
        self._batched = batched

    def expand(self, inputs):
        batches = inputs if self._batched else inputs | "BatchRows" >> ToRecordBatches(self._schema, self._batch_rows)
        settings = self._settings
        models = (
            batches
            | "SampleBatchMaps" >> beam.ParDo(SampleBatchMaps(settings.sample_size))
            | "SampleMapsPerClass" >> beam.CombinePerKey(SampleMapsFn(settings.sample_size))
            | "ClusterClassMaps" >> beam.MapTuple(lambda cls, items: (cls, strategies_of(items, settings)))
        )
        assigned = (
            batches
            | "AssignStrategies" >> beam.ParDo(
                AssignStrategies(settings.exemplars), models=beam.pvalue.AsDict(models)
            ).with_outputs(MEMBERS_TAG, EXEMPLAR_CANDIDATES_TAG, main="batches")
        )
        clusters = (
            assigned[MEMBERS_TAG]
            | "CombinePerCluster" >> beam.CombinePerKey(ClusterStatsFn(settings.exemplars))
            | "KeyClustersByClass" >> beam.MapTuple(lambda key, stats: (key[0], (key[1], stats)))
            | "GroupClustersByClass" >> beam.GroupByKey()
            | "FormatClusterRows" >> beam.FlatMap(
                lambda kv, models: cluster_rows(kv[0], list(kv[1]), models.get(kv[0]), settings),
                models=beam.pvalue.AsDict(models),
            )
        )
        return {"heatmaps": assigned.batches, "clusters": clusters, "models": models,
                "exemplar_candidates": assigned[EXEMPLAR_CANDIDATES_TAG]}


class AddStrategyColumns(beam.PTransform):
    """class_stats rows + clusters rows -> class_stats rows with num_strategies and suspicious_strategy."""

    def __init__(self, clusters):
        super().__init__()
        self._clusters = clusters

    def expand(self, stats):
        summary = (
            self._clusters
            | "KeyByClass" >> beam.Map(lambda r: (r["class_id"], (1, bool(r["suspicious"]))))
            | "CountStrategies" >> beam.CombinePerKey(_sum_summary)
        )

        def add(row, summaries):
            found = summaries.get(row["class_id"])
            return {**row, "num_strategies": None if found is None else found[0],
                    "suspicious_strategy": None if found is None else found[1]}

        return stats | "AddColumns" >> beam.Map(add, summaries=beam.pvalue.AsDict(summary))


def _sum_summary(items) -> tuple[int, bool]:
    count, suspicious = 0, False
    for n, flag in items:
        count += n
        suspicious = suspicious or flag
    return count, suspicious
