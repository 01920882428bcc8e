"""Loading Keras models from files (local, gs://, ...) or keras.applications.

Every model is loaded with Keras safe mode on (no arbitrary code from Lambda
layers) unless the caller opts out. Files on remote filesystems are copied to
a local temporary file through Beam's FileSystems first: TensorFlow's own
gs:// support ignores the storage emulator and Keras needs a local path.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading

from apache_beam.io.filesystems import FileSystems

from transforms.errors import AuditError

_MODEL_SUFFIXES = (".keras", ".h5", ".hdf5")
_RANDOM_SEED = 1234
_BUILD_LOCK = threading.Lock()


def application_names() -> dict[str, str]:
    """Lower-case name -> constructor name in keras.applications."""
    import keras

    names = {}
    for attr in dir(keras.applications):
        if attr[:1].isupper() and callable(getattr(keras.applications, attr)):
            names[attr.lower()] = attr
            names[attr.lower().replace("v2", "_v2").replace("v3", "_v3")] = attr
    return names


def is_application_name(uri: str) -> bool:
    """True when `uri` names a keras.applications model rather than a file."""
    return not uri.lower().endswith(_MODEL_SUFFIXES) and "/" not in uri and "." not in uri


def local_copy(uri: str, directory: str) -> str:
    """A local path with the content of `uri`; local paths are returned as is."""
    if "://" not in uri:
        if not os.path.exists(uri):
            raise AuditError(f"--model: expected an existing file, {uri!r} does not exist")
        return uri
    if not FileSystems.exists(uri):
        raise AuditError(f"expected an existing file, {uri!r} does not exist")
    target = os.path.join(directory, os.path.basename(uri))
    with FileSystems.open(uri) as src, open(target, "wb") as dst:
        shutil.copyfileobj(src, dst, length=1 << 22)
    return target


def file_sha256(uri: str) -> str:
    """SHA-256 of a file read through Beam's FileSystems."""
    digest = hashlib.sha256()
    with FileSystems.open(uri) as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_fingerprint(model_uri: str, weights: str | None) -> str:
    """What identifies the model: the file's hash, or the app name + weights hash."""
    if is_application_name(model_uri):
        if weights:
            return f"{model_uri}:sha256:{file_sha256(weights)}"
        return f"{model_uri}:random-init:seed{_RANDOM_SEED}"
    return f"sha256:{file_sha256(model_uri)}"


def configure_devices(memory_growth: bool = True) -> list:
    """Turns on GPU memory growth (several SDK processes may share one GPU).

    Returns:
      The visible GPUs (empty on CPU-only machines).
    """
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, memory_growth)
        except RuntimeError:
            pass  # already initialised in this process: the setting is fixed
    return gpus


def load_keras_model(model_uri: str, *, weights: str | None = None, safe_mode: bool = True):
    """Loads a classifier from a file or builds a keras.applications model.

    Args:
      model_uri: a `.keras`/`.h5` path (local or any Beam filesystem), or a
        keras.applications name such as "resnet50".
      weights: with an application name, a weights file; without one the
        weights are random but the same in every process (fixed seed).
      safe_mode: Keras safe mode (refuses to deserialize Lambda code).
    """
    import keras

    if is_application_name(model_uri):
        names = application_names()
        key = model_uri.lower()
        if key not in names:
            raise AuditError(
                f"--model: expected a .keras/.h5 file or a keras.applications name "
                f"(e.g. resnet50, mobilenet_v2, vgg19), got {model_uri!r}"
            )
        with _BUILD_LOCK:
            keras.utils.set_random_seed(_RANDOM_SEED)
            model = getattr(keras.applications, names[key])(weights=None)
        if weights:
            with tempfile.TemporaryDirectory() as tmp:
                model.load_weights(local_copy(weights, tmp))
        return model
    if not model_uri.lower().endswith(_MODEL_SUFFIXES):
        raise AuditError(f"--model: expected a .keras or .h5 file, got {model_uri!r}")
    with tempfile.TemporaryDirectory() as tmp:
        path = local_copy(model_uri, tmp)
        try:
            return keras.models.load_model(path, compile=False, safe_mode=safe_mode)
        except ValueError as exc:
            if "safe_mode" in str(exc) or "unsafe" in str(exc).lower():
                raise AuditError(
                    f"--model {model_uri}: the file holds code (e.g. a Lambda layer) that Keras "
                    "safe mode refuses to load. Only if you trust the file, pass --unsafe_model."
                ) from exc
            raise
