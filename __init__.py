"""autoopt: the self-tuning layer of an inference engine.

Importing `autoopt` registers `autoopt/InferenceTuning-v0` with gymnasium. Gymnasium is
not imported for that: the runtime policy (`autoopt.policies`) must load with numpy
alone, so registration runs now if gymnasium is already imported, or the moment it is.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"


def _register() -> None:
    from .envs import register_envs

    register_envs()


class _RegisterOnGymnasiumImport(importlib.abc.MetaPathFinder):
    """Runs the registration right after `gymnasium` finishes importing."""

    def find_spec(self, name, path=None, target=None):  # type: ignore[override]
        if name != "gymnasium":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_and_register(module):  # type: ignore[no-untyped-def]
            exec_module(module)
            _register()

        loader.exec_module = exec_and_register  # type: ignore[method-assign]
        return spec


if "gymnasium" in sys.modules:
    _register()
elif not any(isinstance(f, _RegisterOnGymnasiumImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterOnGymnasiumImport())
