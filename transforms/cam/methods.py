"""CAM methods: each says only how the map is made from activations and grads.

Every function takes, for a batch of B images,
  activations ``A``: float32 [B, h, w, C], the target layer's output, and
  gradients ``G``:   float32 [B, h, w, C], d(score of the target class)/dA,
and returns the class activation map float32 [B, h, w] after the method's
ReLU, before any normalisation. Keras is channels-last: spatial axes are 1, 2.
The shared driver (`transforms.cam.explainer`) does everything else.
"""

from __future__ import annotations

from typing import Callable

_EPS = 1e-7


def _weighted_sum(activations, weights):
    """ReLU(sum_c w[b, c] * A[b, :, :, c]) -> [B, h, w]."""
    import tensorflow as tf

    return tf.nn.relu(tf.einsum("bhwc,bc->bhw", activations, weights))


def gradcam(activations, gradients):
    """Grad-CAM, Selvaraju et al. 2017, Eq. 1-2.

    alpha_c = 1/Z sum_ij dS/dA_ij^c;  L = ReLU(sum_c alpha_c A^c).
    """
    import tensorflow as tf

    weights = tf.reduce_mean(gradients, axis=(1, 2))
    return _weighted_sum(activations, weights)


def gradcampp(activations, gradients):
    """Grad-CAM++, Chattopadhay et al. 2018, Eq. 19 (exponential score).

    a_ij^c = g^2 / (2 g^2 + sum_ab A_ab^c g^3);  w_c = sum_ij a_ij^c ReLU(g_ij^c);
    L = ReLU(sum_c w_c A^c), with g = dS/dA (the same closed form as
    pytorch-grad-cam and tf-keras-vis use).
    """
    import tensorflow as tf

    g2 = tf.square(gradients)
    g3 = g2 * gradients
    sum_a = tf.reduce_sum(activations, axis=(1, 2), keepdims=True)
    denominator = 2.0 * g2 + sum_a * g3
    alpha = tf.math.divide_no_nan(g2, tf.where(denominator != 0.0, denominator, _EPS))
    alpha = tf.where(gradients != 0.0, alpha, 0.0)
    weights = tf.reduce_sum(alpha * tf.nn.relu(gradients), axis=(1, 2))
    return _weighted_sum(activations, weights)


def hirescam(activations, gradients):
    """HiResCAM, Draelos & Carin 2020, Eq. 3: L = ReLU(sum_c g^c (.) A^c)."""
    import tensorflow as tf

    return tf.nn.relu(tf.reduce_sum(gradients * activations, axis=-1))


def layercam(activations, gradients):
    """LayerCAM, Jiang et al. 2021, Eq. 5-6: L = ReLU(sum_c ReLU(g^c) (.) A^c)."""
    import tensorflow as tf

    return tf.nn.relu(tf.reduce_sum(tf.nn.relu(gradients) * activations, axis=-1))


def xgradcam(activations, gradients):
    """XGrad-CAM, Fu et al. 2020, Eq. 11.

    w_c = sum_ij (A_ij^c / sum_ab A_ab^c) g_ij^c;  L = ReLU(sum_c w_c A^c).
    """
    import tensorflow as tf

    sum_a = tf.reduce_sum(activations, axis=(1, 2))
    weights = tf.reduce_sum(activations * gradients, axis=(1, 2)) / (sum_a + _EPS)
    return _weighted_sum(activations, weights)


METHODS: dict[str, Callable] = {
    "gradcam": gradcam,
    "gradcampp": gradcampp,
    "hirescam": hirescam,
    "layercam": layercam,
    "xgradcam": xgradcam,
}
