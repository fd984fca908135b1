"""autoopt.policies: the trained policy as the engine runs it.

Importing this package loads numpy and `runtime.py` only: never torch, stable-baselines3 or
gymnasium, so the serving process stays small. `export_policy` (which needs them) is loaded
on first use.
"""

from __future__ import annotations

from typing import Any

from .runtime import FORMAT_VERSION, PolicyFileError, RuntimePolicy

__all__ = ["FORMAT_VERSION", "PolicyFileError", "RuntimePolicy", "export_policy"]


def __getattr__(name: str) -> Any:
    if name == "export_policy":
        from .export import export_policy

        return export_policy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
