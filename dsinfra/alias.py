"""DeepSeek's import names for dsinfra's components, so that code written for
the originals runs unchanged::

    import dsinfra.alias  # from here on:
    import flash_mla      # is dsinfra.flash_mla
    from deep_gemm.utils import ceil_div  # dsinfra.deep_gemm.utils
    import deep_ep, dualpipe, eplb

or, without touching the code, ``python -m dsinfra run script.py [args]``
(which also covers the processes the script starts).

Each name, and every submodule under it, resolves to the same module object
as dsinfra's (``flash_mla is dsinfra.flash_mla``): state such as DualPipe's
p2p shapes is shared whichever name sets it. A submodule dsinfra does not
have raises ``ModuleNotFoundError`` as usual.

A real installed package of the same name (DeepSeek's own ``deep_ep``, say)
always wins: the alias steps aside for it, unless asked to shadow it with
``install(override=True)``, ``DSINFRA_ALIAS_OVERRIDE=1`` in the environment
before ``import dsinfra.alias``, or ``python -m dsinfra run --override``.
Install before the first import of a name: a module already imported stays
what it is.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys

# upstream name -> dsinfra module
ALIASES = {
    "flash_mla": "dsinfra.flash_mla",
    "deep_gemm": "dsinfra.deep_gemm",
    "deep_ep": "dsinfra.deep_ep",
    "dualpipe": "dsinfra.dualpipe",
    "eplb": "dsinfra.eplb",
}


class _AliasLoader(importlib.abc.Loader):
    """Loads an upstream name as the dsinfra module it stands for."""

    def __init__(self, target: str):
        self.target = target
        self.own_spec = None

    def create_module(self, spec):
        module = importlib.import_module(self.target)
        self.own_spec = module.__spec__
        return module

    def exec_module(self, module) -> None:
        # Since create_module, the import system has labelled dsinfra's module with the alias's spec: undo that.
        module.__spec__ = self.own_spec


class AliasFinder(importlib.abc.MetaPathFinder):
    """The meta path finder behind the aliases (first on ``sys.meta_path``)."""

    def __init__(self, override: bool):
        self.override = override

    def find_spec(self, fullname, path, target=None):
        top, _, rest = fullname.partition(".")
        if top not in ALIASES:
            return None
        if rest:  # a submodule: ours only when its top-level package is ours
            parent = sys.modules.get(top)
            if parent is None or parent.__name__ != ALIASES[top]:
                return None
        elif not self.override and self._installed_elsewhere(fullname, path):
            return None
        target_name = ALIASES[top] + (f".{rest}" if rest else "")
        found = importlib.util.find_spec(target_name)
        if found is None:
            return None
        return importlib.machinery.ModuleSpec(
            fullname, _AliasLoader(target_name), is_package=found.submodule_search_locations is not None
        )

    def _installed_elsewhere(self, name: str, path) -> bool:
        """Whether another finder (site-packages, an editable install, ...) has ``name``."""
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            if finder.find_spec(name, path) is not None:
                return True
        return False


def installed() -> AliasFinder | None:
    """The finder on ``sys.meta_path``, if the aliases are installed."""
    return next((f for f in sys.meta_path if isinstance(f, AliasFinder)), None)


def install(override: bool | None = None) -> AliasFinder:
    """Make DeepSeek's names resolve to dsinfra's modules (idempotent).

    override: shadow real installed packages of those names too (default: the
        ``DSINFRA_ALIAS_OVERRIDE`` environment variable, ``1`` for yes).
    """
    if override is None:
        override = os.environ.get("DSINFRA_ALIAS_OVERRIDE", "") == "1"
    finder = installed()
    if finder is None:
        finder = AliasFinder(override)
        sys.meta_path.insert(0, finder)
    finder.override = override
    return finder


def uninstall() -> None:
    """Take the aliases off ``sys.meta_path``, and forget the names already
    imported through them (dsinfra's own modules stay imported)."""
    finder = installed()
    if finder is not None:
        sys.meta_path.remove(finder)
    for name, module in list(sys.modules.items()):
        top = name.partition(".")[0]
        if top in ALIASES and getattr(module, "__name__", "").startswith(ALIASES[top]):
            del sys.modules[name]


install()
