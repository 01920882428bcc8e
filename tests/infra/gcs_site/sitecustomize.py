"""Anonymous GCS for Beam in every process that has this folder on PYTHONPATH.

With STORAGE_EMULATOR_HOST set (tests against gcp-storage-emulator), Beam's
gs:// filesystem would first spend ~25 s per process retrying
`google.auth.default()` (4 retries with exponential backoff from 2 s,
apache_beam/internal/gcp/auth.py) before falling back to an anonymous
client. This hook marks Beam's credential cache as already filled with
"no credentials" when `apache_beam.internal.gcp.auth` is first imported, so
`create_storage_client` goes straight to the anonymous client, which
google-cloud-storage points at the emulator. Nothing is imported eagerly:
processes that never touch Beam pay nothing.

Only active when STORAGE_EMULATOR_HOST is set. Test-only: never ship this.
"""

import os
import sys

if os.environ.get("STORAGE_EMULATOR_HOST"):
    import importlib.abc

    _TARGET = "apache_beam.internal.gcp.auth"

    def _preseed(module):
        module._Credentials._credentials_init = True
        module._Credentials._credentials = None

    class _PreseedLoader(importlib.abc.Loader):
        def __init__(self, loader):
            self._loader = loader

        def create_module(self, spec):
            return self._loader.create_module(spec)

        def exec_module(self, module):
            self._loader.exec_module(module)
            _preseed(module)

    class _PreseedFinder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != _TARGET:
                return None
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(name, path, target)
                if spec is not None and spec.loader is not None:
                    spec.loader = _PreseedLoader(spec.loader)
                    return spec
            return None

    if _TARGET in sys.modules:
        _preseed(sys.modules[_TARGET])
    else:
        sys.meta_path.insert(0, _PreseedFinder())
