"""dsinfra: DeepSeek's open infrastructure in portable Python.

Components load on first use, so ``import dsinfra`` stays cheap::

    from dsinfra import flash_mla, deep_gemm, deep_ep, dualpipe, eplb
"""

import importlib
import pkgutil

__version__ = "0.1.0"


def subpackages() -> list[str]:
    """Names of dsinfra's subpackages (components and infrastructure), sorted."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.ispkg)


def __getattr__(name: str):
    if name in subpackages():
        module = importlib.import_module(f"{__name__}.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(subpackages()))
