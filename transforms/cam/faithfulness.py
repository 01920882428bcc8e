"""Is the map faithful to the model? Batched region deletion and a sanity check.

Pure TensorFlow/NumPy (no Beam). Two pieces:

`FaithfulnessScorer`: deletion scores in ONE compiled `tf.function` with a
fixed input signature (one trace for any batch size):

    images float32 [B, H, W, C] (the pixels the explainer was given),
    cams float32 [B, h, w], targets int32 [B], seeds int32 [B]
      -> CAM upsampled (bilinear) to [B, H, W], pixels ranked
      -> for each order in (MoRF, LeRF, random) and q in FRACTIONS:
           remove the q*H*W pixels ranked first, impute them, score
      -> drop[order, q] = p(target | image) - p(target | perturbed image)

  * MoRF removes the most relevant pixels first (top q of the map), LeRF the
    least relevant (bottom q), "random" the top q of a random map of the CAM's
    resolution upsampled the same way, so the random region has the same area
    and the same blob size as the CAM's region (a scatter of single pixels is
    almost invisible after imputation and would make any map look good).
  * Score: the target class's probability (softmax of the logits, or sigmoid
    for a sigmoid head, exactly `CamExplainer`'s `target_score`). The CAM
    explains the logit; the probability is bounded, so drops are comparable
    across images and classes (RISE and ROAD also use it).
  * faithfulness_<order> = the drop averaged over q (a 4-point estimate of the
    area under the deletion curve); gap = morf - random. A faithful map has
    morf > random (gap > 0) and lerf close to 0.
  * Removal (`removal="impute"`, default): the removed pixels are filled from
    the KEPT pixels only by push-pull pyramid interpolation (Gortler et al.
    1996): kept pixels are averaged down a pyramid of 2x2 means with their
    weights, and holes are filled back up by bilinear upsampling of the
    coarser levels. This stands in for ROAD's noisy linear imputation (Rong et
    al., ICML 2022), which solves a sparse linear system per image so that
    each removed pixel is the mean of its neighbours; that solve does not
    batch inside a tf.function. Both give a smooth fill with no hard edges
    (no out-of-distribution borders around the hole) that carries no
    information from the removed pixels (a plain blur of the image would leak
    the removed content back). Like ROAD, Gaussian noise (`noise`, default
    1% of 0-255) is added to the filled pixels so the hole's shape is not a
    clean signal. `removal="constant"` fills with `fill_value` (the classic
    pixel-flipping baseline; used for the peer check with Quantus).
  * All perturbed copies go through the model as batched calls of B images,
    one per (order, q) variant plus the unperturbed batch, inside a
    `tf.map_fn` over the 13 variants (a graph loop, parallel_iterations=1 so
    memory stays that of one batch): no Python loop over images or steps.
  * Randomness (tie-breaking, the random map, the noise) comes from an integer
    hash of (seed, position), so an image's scores depend only on its seed,
    not on the batch it lands in.

`cascading_randomisation`: the model-parameter randomisation test (Adebayo et
al., "Sanity checks for saliency maps", NeurIPS 2018): the head's weighted
layers (after the target layer) are re-initialised one by one from the top,
the same images re-explained for the same target classes after each step,
and the Spearman rank correlation between each image's real and randomised
map reported. A map that barely changes when the weights that produce the
class score are random does not depend on what the model learnt.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np

FRACTIONS = (0.1, 0.2, 0.3, 0.5)
ORDERS = ("morf", "lerf", "random")
REMOVALS = ("impute", "constant")
_MASK32 = 0xFFFFFFFF


def _hash_uniform(tf, seeds, count: int, stream: int):
    """Uniform [0, 1) floats [B, count] from an integer hash of (seed, stream, index).

    A 32-bit integer mixer (two multiply-xorshift rounds) evaluated in int64
    (every product stays below 2**63): deterministic per image, vectorised.
    """
    bits = tf.bitwise
    mask = tf.constant(_MASK32, tf.int64)
    index = tf.range(count, dtype=tf.int64)[None, :]
    seed = bits.bitwise_and(tf.cast(seeds, tf.int64)[:, None], mask)
    x = bits.bitwise_and(seed * 1_000_003 + index + stream * 7_919_993, mask)
    for _ in range(2):
        x = bits.bitwise_and(bits.bitwise_xor(bits.right_shift(x, 16), x) * 0x45D9F3B, mask)
    x = bits.bitwise_xor(bits.right_shift(x, 16), x)
    return tf.cast(x, tf.float32) / float(2**32)


def push_pull_fill(tf, images, keep):
    """Fills pixels where keep == 0 from the kept pixels (push-pull interpolation).

    Args:
      images: float32 [B, H, W, C].
      keep: float32 [B, H, W, 1], 1 = kept, 0 = removed.

    Returns:
      float32 [B, H, W, C]: kept pixels unchanged, removed ones interpolated
      from kept pixels only. With nothing kept, 0.
    """
    values, weights = [images * keep], [keep]
    h, w = images.shape[1], images.shape[2]
    while h > 1 or w > 1:  # pyramid levels: fixed by the static input shape (traced once)
        values.append(tf.nn.avg_pool2d(values[-1], 2, 2, "SAME"))
        weights.append(tf.nn.avg_pool2d(weights[-1], 2, 2, "SAME"))
        h, w = (h + 1) // 2, (w + 1) // 2
    filled = tf.math.divide_no_nan(values[-1], weights[-1])
    for level in range(len(values) - 2, -1, -1):
        size = (values[level].shape[1], values[level].shape[2])
        up = tf.image.resize(filled, size, method="bilinear")
        filled = values[level] + (1.0 - weights[level]) * up
    return filled


def _preprocess_of(explainer) -> Callable:
    fn = getattr(explainer, "preprocess", None)
    if callable(fn):
        return fn
    return explainer._preprocess


class FaithfulnessScorer:
    """Deletion scores (MoRF, LeRF, random) for batches, one compiled function.

    Attributes:
      score: the tf.function (images, cams, targets, seeds) -> dict of tensors:
        base_score [B], curves [3, B, F] (drops per order and fraction),
        morf/lerf/random/gap [B].
    """

    def __init__(
        self,
        model: Callable,
        *,
        input_shape: Sequence[int],
        cam_shape: Sequence[int],
        head: str = "softmax",
        preprocess: Optional[Callable] = None,
        fractions: Sequence[float] = FRACTIONS,
        removal: str = "impute",
        noise: float = 2.55,
        fill_value: float = 0.0,
        pixel_range: tuple[float, float] = (0.0, 255.0),
    ):
        """Args:
          model: callable images -> logits (the explainer's model: its head is linear).
          input_shape: (H, W, C) of the images.
          cam_shape: (h, w) of the maps.
          head: "sigmoid" scores with a sigmoid, anything else with a softmax.
          preprocess: applied to the (perturbed) images before the model.
          fractions: the shares q of the image removed.
          removal: "impute" (push-pull fill + noise) or "constant" (fill_value).
          noise: standard deviation of the noise added to imputed pixels.
          pixel_range: imputed pixels are clipped to it.
        """
        import tensorflow as tf

        if removal not in REMOVALS:
            raise ValueError(f"removal: expected one of {REMOVALS}, got {removal!r}")
        self.model = model
        self.input_shape = tuple(int(d) for d in input_shape)
        self.cam_shape = tuple(int(d) for d in cam_shape)
        self.head = head
        self.preprocess = preprocess or (lambda x: x)
        self.fractions = tuple(float(q) for q in fractions)
        self.removal = removal
        self.noise = float(noise)
        self.fill_value = float(fill_value)
        self.pixel_range = pixel_range
        self.score = tf.function(
            self._score,
            input_signature=[
                tf.TensorSpec([None, *self.input_shape], tf.float32, name="images"),
                tf.TensorSpec([None, *self.cam_shape], tf.float32, name="cams"),
                tf.TensorSpec([None], tf.int32, name="targets"),
                tf.TensorSpec([None], tf.int32, name="seeds"),
            ],
        )

    @classmethod
    def from_explainer(cls, explainer, **kwargs) -> "FaithfulnessScorer":
        """A scorer on a `CamExplainer`'s model, preprocessing and head.

        The explainer's own `_logits` (preset, cast to the model's input dtype,
        one-element output lists unwrapped) is used where it has one, so the
        perturbed images reach the model exactly as the explained ones did.
        """
        logits = getattr(explainer, "_logits", None)
        if callable(logits):
            return cls(lambda images, training=False: logits(images), input_shape=explainer.input_shape,
                       cam_shape=explainer.cam_shape, head=explainer.head, **kwargs)
        return cls(
            explainer.model,
            input_shape=explainer.input_shape,
            cam_shape=explainer.cam_shape,
            head=explainer.head,
            preprocess=_preprocess_of(explainer),
            **kwargs,
        )

    def _probability(self, images, targets):
        import tensorflow as tf

        logits = tf.cast(self.model(self.preprocess(images), training=False), tf.float32)
        probs = tf.sigmoid(logits) if self.head == "sigmoid" else tf.nn.softmax(logits, axis=-1)
        return tf.gather(probs, targets, batch_dims=1)

    def ranks(self, cams, seeds):
        """Removal order of every pixel: int32 [3, B, H*W] (0 = removed first) for MoRF, LeRF, random."""
        import tensorflow as tf

        height, width, _ = self.input_shape
        n = height * width
        h, w = self.cam_shape

        def upsampled_order(maps, stream):
            up = tf.image.resize(maps[..., None], (height, width), method="bilinear")
            up = tf.reshape(up, [-1, n])
            lo = tf.reduce_min(up, axis=1, keepdims=True)
            span = tf.reduce_max(up, axis=1, keepdims=True) - lo
            scaled = tf.math.divide_no_nan(up - lo, span)
            # Ties (flat zero regions of a ReLU'd map) are broken at random.
            key = scaled + 1e-6 * _hash_uniform(tf, seeds, n, stream)
            order = tf.argsort(key, axis=1, direction="DESCENDING", stable=True)
            return tf.argsort(order, axis=1, stable=True)  # inverse permutation: rank of each pixel

        morf = upsampled_order(tf.cast(cams, tf.float32), 1)
        random_maps = tf.reshape(_hash_uniform(tf, seeds, h * w, 2), [-1, h, w])
        rand = upsampled_order(random_maps, 3)
        return tf.cast(tf.stack([morf, n - 1 - morf, rand]), tf.int32)

    def noise_field(self, seeds):
        """The Gaussian noise added to imputed pixels: float32 [B, H, W, C] (Box-Muller on hashed uniforms)."""
        import tensorflow as tf

        height, width, channels = self.input_shape
        count = height * width * channels
        u1 = _hash_uniform(tf, seeds, count, 4)
        u2 = _hash_uniform(tf, seeds, count, 5)
        gauss = tf.sqrt(-2.0 * tf.math.log(1.0 - u1)) * tf.cos(2.0 * np.pi * u2)
        return self.noise * tf.reshape(gauss, [-1, height, width, channels])

    def remove(self, images, removed, seeds, noise=None):
        """images [B, H, W, C] with `removed` ([B, H, W] bool) pixels replaced.

        `noise` ([B, H, W, C], default `noise_field(seeds)`) is added to the imputed pixels.
        """
        import tensorflow as tf

        keep = 1.0 - tf.cast(removed, tf.float32)[..., None]
        if self.removal == "constant":
            return images * keep + self.fill_value * (1.0 - keep)
        filled = push_pull_fill(tf, images, keep)
        if self.noise > 0:
            noise = self.noise_field(seeds) if noise is None else noise
            filled = filled + (1.0 - keep) * noise
        return tf.clip_by_value(filled, *self.pixel_range)

    def _score(self, images, cams, targets, seeds):
        import tensorflow as tf

        height, width, _ = self.input_shape
        n = height * width
        ranks = self.ranks(cams, seeds)  # [3, B, N]
        counts = [int(round(q * n)) for q in self.fractions]
        # Variant 0 is the unperturbed batch; then every (order, fraction).
        sources = tf.constant([0] + [o for o in range(len(ORDERS)) for _ in counts], tf.int32)
        removed_counts = tf.constant([0] + counts * len(ORDERS), tf.int32)
        noise = self.noise_field(seeds) if self.removal == "impute" and self.noise > 0 else None  # once per batch

        def one_variant(v):
            removed = tf.gather(ranks, sources[v]) < removed_counts[v]
            removed = tf.reshape(removed, [-1, height, width])
            return self._probability(self.remove(images, removed, seeds, noise), targets)

        scores = tf.map_fn(
            one_variant,
            tf.range(tf.size(sources)),
            fn_output_signature=tf.TensorSpec([None], tf.float32),
            parallel_iterations=1,
        )  # [V, B]
        base = scores[0]
        curves = tf.reshape(base[None, :] - scores[1:], [len(ORDERS), len(counts), -1])
        curves = tf.transpose(curves, [0, 2, 1])  # [3, B, F]
        means = tf.reduce_mean(curves, axis=2)  # [3, B]
        return {
            "base_score": base,
            "curves": curves,
            "morf": means[0],
            "lerf": means[1],
            "random": means[2],
            "gap": means[0] - means[2],
        }

    def __call__(self, images, cams, targets, seeds) -> dict:
        """numpy in (see `score`), dict of numpy arrays out."""
        out = self.score(
            np.asarray(images, np.float32),
            np.asarray(cams, np.float32),
            np.asarray(targets, np.int32),
            np.asarray(seeds, np.int32),
        )
        return {key: value.numpy() for key, value in out.items()}


# --- Sanity check: cascading randomisation of the head --------------------------------


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n of a 1-D array, ties given their average rank (as scipy's rankdata)."""
    values = np.asarray(values, np.float64).ravel()
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    starts = np.r_[True, sorted_values[1:] != sorted_values[:-1]]
    group = np.cumsum(starts) - 1
    first = np.flatnonzero(starts)
    last = np.r_[first[1:], len(values)] - 1
    ranks = np.empty(len(values))
    ranks[order] = (first[group] + last[group]) / 2.0 + 1.0
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> Optional[float]:
    """Spearman rank correlation of two maps (None when either is constant)."""
    ra, rb = average_ranks(a), average_ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def head_layers(model, target_layer: str) -> list:
    """The model's top-level layers after the target layer that hold weights, last first."""
    top = target_layer.split("/")[0]
    names = [layer.name for layer in model.layers]
    start = names.index(top) + 1 if top in names else 0
    return [layer for layer in model.layers[start:] if layer.weights][::-1]


def randomise_layer(layer, rng: np.random.Generator) -> None:
    """Re-initialises a layer's weights: normal, with each weight's own standard deviation.

    (A weight with no spread, such as a zero bias, gets the spread 0.05.)
    """
    for variable in layer.weights:
        value = np.asarray(variable.numpy())
        std = float(value.std()) or 0.05
        variable.assign(rng.normal(0.0, std, value.shape).astype(value.dtype))


def cascading_randomisation(explainer, images: np.ndarray, targets: np.ndarray, *, seed: int = 0) -> dict:
    """Adebayo et al.'s cascading model-parameter randomisation over the head.

    `explainer` must explain the class given as its label (`--target label`)
    and own its model: the head's weights are overwritten.

    Returns:
      {"layers": [name, ...] (randomised, in order), "correlations": [mean
      Spearman after each step], "per_image": [per-image Spearman after the
      last step], "real_maps_constant": images whose real map was flat}.
    """
    rng = np.random.default_rng(seed)
    targets = np.asarray(targets, np.int32)
    real = explainer(images, targets)["cam"][:, 0]
    layers = head_layers(explainer.model, explainer.target_layer)
    names, means, per_image = [], [], []
    for layer in layers:
        randomise_layer(layer, rng)
        cams = explainer(images, targets)["cam"][:, 0]
        # A map that became flat has lost every rank it had: correlation 0.
        per_image = [None if np.ptp(a) == 0 else (spearman(a, b) or 0.0) for a, b in zip(real, cams, strict=True)]
        valid = [c for c in per_image if c is not None]
        names.append(layer.name)
        means.append(float(np.mean(valid)) if valid else None)
    return {
        "layers": names,
        "correlations": means,
        "per_image": per_image,
        "real_maps_constant": int(sum(float(np.ptp(m)) == 0 for m in real)),
    }
