"""Loading Keras models from files, SavedModel folders or keras.applications.

What is accepted (docs/models.md lists the same):

| what the user has                                | loaded with               |
|--------------------------------------------------|---------------------------|
| Keras 3 `.keras` file, or `.h5` saved by Keras 3 | `keras.models.load_model` |
| `.h5`/`.hdf5`/`.keras` saved by (tf.)Keras 2     | `tf_keras` (extra `keras2`) |
| SavedModel folder written by tf.keras 2          | `tf_keras` (extra `keras2`) |
| a keras.applications name (`resnet50`, ...)      | `keras.applications`      |
| a keras_hub model saved as `.keras`              | `keras.models.load_model` (extra `hub`) |

Grad-CAM needs the model's layers (to read a layer's activations), so a
SavedModel holding only signatures (no `keras_metadata.pb`) is refused with a
one-line `AuditError` saying what to export instead.

Every model is loaded with Keras safe mode on (no arbitrary code from Lambda
layers) unless the caller opts out. Files and folders on remote filesystems
are copied to a local temporary folder through Beam's FileSystems first:
TensorFlow's own gs:// support ignores the storage emulator and Keras needs a
local path.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import zipfile

from apache_beam.io.filesystems import FileSystems

from transforms.custom_code import CustomCode, custom_objects
from transforms.errors import AuditError, one_line

_MODEL_SUFFIXES = (".keras", ".h5", ".hdf5")
_SAVED_MODEL_FILE = "saved_model.pb"
_KERAS_METADATA_FILE = "keras_metadata.pb"
_RANDOM_SEED = 1234
_BUILD_LOCK = threading.Lock()
KERAS2_EXTRA = "pip install 'gradcam-audit[keras2]' (the tf_keras package)"
HUB_EXTRA = (
    "pip install 'gradcam-audit[hub]' then pip install --no-deps keras-hub==0.32.0 (keras-hub's own "
    "requirements pull tensorflow-text; scripts/setup_venv.sh does both)"
)


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
    """True when `uri` names a keras.applications model rather than a file or folder."""
    return (
        not uri.lower().endswith(_MODEL_SUFFIXES)
        and "/" not in uri
        and "." not in uri
        and not os.path.isdir(uri)
    )


def _join(uri: str, name: str) -> str:
    return FileSystems.join(uri.rstrip("/"), name)


def is_saved_model_dir(uri: str) -> bool:
    """True when `uri` (local or remote) is a folder holding a saved_model.pb."""
    if "://" not in uri:
        return os.path.isfile(os.path.join(uri, _SAVED_MODEL_FILE))
    return FileSystems.exists(_join(uri, _SAVED_MODEL_FILE))


def _tree_files(uri: str) -> list[str]:
    """Every file under a folder (local or remote), sorted."""
    return sorted(m.path for m in FileSystems.match([_join(uri, "**")])[0].metadata_list)


def local_copy(uri: str, directory: str) -> str:
    """A local path with the content of file or SavedModel folder `uri`; local paths are returned as is."""
    if "://" not in uri:
        if not os.path.exists(uri):
            raise AuditError(f"--model: expected an existing file or folder, {uri!r} does not exist")
        return uri
    if is_saved_model_dir(uri):
        root = uri.rstrip("/")
        target = os.path.join(directory, os.path.basename(root))
        for path in _tree_files(root):
            local = os.path.join(target, *path[len(root) + 1 :].split("/"))
            os.makedirs(os.path.dirname(local), exist_ok=True)
            with FileSystems.open(path) as src, open(local, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 22)
        return target
    if not FileSystems.exists(uri):
        raise AuditError(f"--model: expected an existing file, {uri!r} does not exist")
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


def tree_sha256(uri: str) -> str:
    """SHA-256 over a folder's files: each relative path and its content's hash, sorted."""
    root = uri.rstrip("/")
    digest = hashlib.sha256()
    for path in _tree_files(root):
        digest.update(f"{os.path.relpath(path, root)}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def model_fingerprint(model_uri: str, weights: str | None) -> str:
    """What identifies the model: the file's (folder's) hash, or the app name + weights hash."""
    if is_application_name(model_uri):
        if weights:
            return f"{model_uri}:sha256:{file_sha256(weights)}"
        return f"{model_uri}:random-init:seed{_RANDOM_SEED}"
    if is_saved_model_dir(model_uri):
        return f"sha256-tree:{tree_sha256(model_uri)}"
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


def saved_by_keras(path: str) -> str:
    """Which Keras wrote a local model file or folder: "keras3", "keras2" or "signatures".

    "signatures" is a SavedModel without Keras metadata (`tf.saved_model.save`
    of a tf.Module, or an export of signatures only).
    """
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, _SAVED_MODEL_FILE)):
            raise AuditError(f"--model {path!r}: a folder, but not a SavedModel (no {_SAVED_MODEL_FILE} in it)")
        return "keras2" if os.path.isfile(os.path.join(path, _KERAS_METADATA_FILE)) else "signatures"
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            try:
                version = json.loads(archive.read("metadata.json")).get("keras_version", "")
            except (KeyError, ValueError):
                version = ""
        return "keras2" if version.startswith("2.") else "keras3"
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            version = handle.attrs.get("keras_version", "")
    except OSError as exc:
        raise AuditError(f"--model {path!r}: expected a .keras (zip) or HDF5 file: {exc}") from None
    version = version.decode() if isinstance(version, bytes) else str(version)
    return "keras2" if version.startswith(("1.", "2.")) else "keras3"


def _refuse_unsafe(model_uri: str, exc: BaseException) -> None:
    text = str(exc)
    if "safe_mode" in text or "unsafe" in text.lower():
        raise AuditError(
            f"--model {model_uri}: the file holds code (e.g. a Lambda layer) that Keras "
            "safe mode refuses to load. Only if you trust the file, pass --unsafe_model."
        ) from exc


def _unknown_class(model_uri: str, exc: BaseException, custom: dict) -> None:
    """A class or function the file names that Keras does not know: which one, and the option that gives it."""
    text = str(exc)
    found = re.search(r"Could not locate (?:class|function) '([^']+)'|Unknown (?:layer|object)[^']*'([^']+)'", text)
    if found:
        name = found.group(1) or found.group(2)
        given = f" (the classes and functions given: {', '.join(sorted(custom))})" if custom else ""
        raise AuditError(
            f"--model {model_uri}: the file uses {name!r}, a class or function Keras does not know; "
            f"pass --custom_objects with the .py file that defines it{given}"
        ) from exc


def _load_tf_keras(path: str, model_uri: str, safe_mode: bool, custom: dict):
    """A tf.keras 2 file or SavedModel, loaded by tf_keras (Keras 2) with safe mode."""
    try:
        import tf_keras
        from tf_keras.src.saving.serialization_lib import SafeModeScope
    except ImportError:
        raise AuditError(f"--model {model_uri}: saved by tf.keras 2; to load it, {KERAS2_EXTRA}") from None
    try:
        # tf_keras applies safe_mode to .keras files only; the scope extends it to .h5 and SavedModel.
        with SafeModeScope(safe_mode):
            return tf_keras.models.load_model(path, compile=False, safe_mode=safe_mode, custom_objects=custom)
    except (ValueError, TypeError, KeyError, OSError, AttributeError, NotImplementedError) as exc:
        _refuse_unsafe(model_uri, exc)
        _unknown_class(model_uri, exc, custom)
        raise AuditError(f"--model {model_uri}: tf_keras could not load it ({one_line(exc)})") from exc


def _keras_hub_import_error() -> str | None:
    """Why `import keras_hub` fails, or None when it imports."""
    try:
        import keras_hub  # noqa: F401
    except ImportError as exc:
        return one_line(exc)
    return None


def _load_keras3(path: str, model_uri: str, safe_mode: bool, custom: dict):
    """A Keras 3 file. Classes of other packages (keras_hub's ViTImageClassifier, ...) are found by the
    module their config names, which Keras imports: keras_hub needs no import here."""
    import keras

    try:
        return keras.models.load_model(path, compile=False, safe_mode=safe_mode, custom_objects=custom)
    except (ValueError, TypeError, KeyError, OSError, AttributeError, NotImplementedError) as exc:
        _refuse_unsafe(model_uri, exc)
        if "keras_hub" in str(exc) and (why := _keras_hub_import_error()):
            raise AuditError(
                f"--model {model_uri}: the model is made of keras_hub classes, and keras_hub cannot be imported "
                f"({why}); to load it, {HUB_EXTRA}"
            ) from exc
        _unknown_class(model_uri, exc, custom)
        raise AuditError(f"--model {model_uri}: Keras could not load it ({one_line(exc)})") from exc


def _load_application(name: str, weights: str | None):
    import keras

    names = application_names()
    key = name.lower()
    if key not in names:
        raise AuditError(
            "--model: expected a .keras/.h5 file, a SavedModel folder or a keras.applications name "
            f"(e.g. resnet50, mobilenet_v2, vgg19), got {name!r}"
        )
    with _BUILD_LOCK:
        keras.utils.set_random_seed(_RANDOM_SEED)
        model = getattr(keras.applications, names[key])(weights=None)
    if weights:
        with tempfile.TemporaryDirectory() as tmp:
            model.load_weights(local_copy(weights, tmp))
    return model


def load_keras_model(model_uri: str, *, weights: str | None = None, safe_mode: bool = True,
                     custom_code: CustomCode = ()):
    """Loads a classifier from a file or folder, or builds a keras.applications model.

    Args:
      model_uri: a `.keras`/`.h5`/`.hdf5` file or a SavedModel folder (local or
        any Beam filesystem), or a keras.applications name such as "resnet50".
      weights: with an application name, a weights file; without one the
        weights are random but the same in every process (fixed seed).
      safe_mode: Keras safe mode (refuses to deserialize Lambda code).
      custom_code: (file, source) of `--custom_objects` files (`transforms.custom_code`): their classes
        and functions are Keras' custom objects.

    Returns:
      A Keras 3 model, or a tf_keras (Keras 2) model for files saved by Keras 2.

    Raises:
      AuditError: one line saying what was expected and what was found.
    """
    if is_application_name(model_uri):
        return _load_application(model_uri, weights)
    if not model_uri.lower().endswith(_MODEL_SUFFIXES) and not is_saved_model_dir(model_uri):
        raise AuditError(
            f"--model: expected a .keras/.h5 file, a SavedModel folder or a keras.applications name, "
            f"got {model_uri!r}"
        )
    custom = custom_objects(custom_code)
    with tempfile.TemporaryDirectory() as tmp:
        path = local_copy(model_uri, tmp)
        kind = saved_by_keras(path)
        if kind == "signatures":
            raise AuditError(
                f"--model {model_uri}: a SavedModel with signatures only (no {_KERAS_METADATA_FILE}); "
                "Grad-CAM reads a layer's activations, so it needs the Keras layers: export the model "
                "with model.save('model.keras') (Keras 3) or model.save('folder') / model.save('model.h5') "
                "in tf.keras 2, not tf.saved_model.save or model.export"
            )
        if kind == "keras2" and (os.path.isdir(path) or _has_tf_keras()):
            return _load_tf_keras(path, model_uri, safe_mode, custom)
        try:
            return _load_keras3(path, model_uri, safe_mode, custom)
        except AuditError as exc:
            if kind == "keras2":  # tf_keras is not installed: say how to get it
                raise AuditError(f"{exc}; the file was saved by Keras 2: {KERAS2_EXTRA}") from exc
            raise


def _has_tf_keras() -> bool:
    import importlib.util

    return importlib.util.find_spec("tf_keras") is not None
