"""autoopt.policies: the trained policy as the engine runs it.

Importing this package loads numpy, `runtime.py` and `policy_file.py` only: never torch,
stable-baselines3 or gymnasium, so the serving process stays small. `export_policy` (which needs them) is loaded
on first use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .policy_file import FORMAT_VERSION, PolicyFileError
from .runtime import RuntimePolicy

__all__ = ["FORMAT_VERSION", "SHIPPED_DIR", "PolicyFileError", "RuntimePolicy", "export_policy", "resolve_policy"]

SHIPPED_DIR = Path(__file__).parent / "shipped"


def resolve_policy(spec: str | Path) -> Path:
    """A shipped policy by name (e.g. 'h100-gpt2-small') or an exported policy's path."""
    path = Path(spec)
    if path.exists():
        return path
    shipped = SHIPPED_DIR / str(spec)
    if shipped.is_dir():
        return shipped
    names = sorted(p.name for p in SHIPPED_DIR.iterdir() if p.is_dir()) if SHIPPED_DIR.is_dir() else []
    raise PolicyFileError(f"no policy at {str(spec)!r}; shipped policies: {', '.join(names) or 'none'}")


def __getattr__(name: str) -> Any:
    if name == "export_policy":
        from .export import export_policy

        return export_policy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
