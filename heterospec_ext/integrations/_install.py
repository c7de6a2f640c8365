"""Swap functions or classes of an engine module for ours, and undo it.

Engines bind kernel functions at import time (``from sgl_kernel import verify_tree_greedy``), so
replacing the attribute of the kernel module alone reaches only later imports. ``patch`` also
rebinds every already-loaded module of the engine whose global still refers to the original object.
"""
import importlib
import sys
import types
from typing import Dict, List, Optional, Tuple


class Installation:
    """What :func:`patch` changed; :meth:`uninstall` restores every binding it replaced."""

    def __init__(self, module: types.ModuleType, replaced: List[Tuple[object, str, object]]):
        self.module = module
        self.replaced = replaced  # (namespace, attribute, original object)

    @property
    def rebound(self) -> List[str]:
        """``"module.attribute"`` for every binding now pointing at a heterospec replacement."""
        return [f"{getattr(ns, '__name__', ns)}.{attr}" for ns, attr, _ in self.replaced]

    def uninstall(self) -> None:
        for namespace, attribute, original in reversed(self.replaced):
            setattr(namespace, attribute, original)
        self.replaced = []


def import_engine(package: str, module: Optional[types.ModuleType], hint: str):
    """``module`` itself, or ``package`` imported; a clear ImportError when it is absent."""
    if module is not None:
        return module
    try:
        return importlib.import_module(package)
    except ImportError as exc:
        raise ImportError(
            f"heterospec_ext.integrations: the package '{package}' is not importable here "
            f"({exc}); {hint}") from exc


def patch(module: types.ModuleType, replacements: Dict[str, object],
          engine_prefixes: Tuple[str, ...]) -> Installation:
    """Set ``module.<name> = replacement`` for each entry and rebind the same original object in
    every loaded module whose name starts with one of ``engine_prefixes``."""
    replaced: List[Tuple[object, str, object]] = []
    for name, replacement in replacements.items():
        original = getattr(module, name, None)
        replaced.append((module, name, original))
        setattr(module, name, replacement)
        if original is None:
            continue
        for loaded in list(sys.modules.values()):
            loaded_name = getattr(loaded, "__name__", "")
            if loaded is module or not isinstance(loaded, types.ModuleType) or \
                    not loaded_name.startswith(engine_prefixes):
                continue
            for attribute, value in list(vars(loaded).items()):
                if value is original:
                    replaced.append((loaded, attribute, original))
                    setattr(loaded, attribute, replacement)
    return Installation(module, replaced)
