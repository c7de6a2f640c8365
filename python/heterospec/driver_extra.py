"""Whether the driver's dependencies are installed. ``pip install heterospec`` installs the
kernels and, with them, this package and its ``heterospec`` command; the driver's own
dependencies (transformers, gguf, ...) come with ``pip install "heterospec[driver]"``, whose
requirements are ``requirements-driver.txt`` next to this module. Without them the command says
so in one line instead of failing deep inside an import. Standard library only, so that it runs
before anything else is imported."""
from __future__ import annotations

import importlib.metadata
import os
import re
from typing import List, Optional

REQUIREMENTS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                 "requirements-driver.txt")
INSTALL_COMMAND = 'pip install "heterospec[driver]"'


def driver_distributions(path: str = REQUIREMENTS_FILE) -> List[str]:
    """The distribution names the driver extra requires, in the file's order."""
    with open(path) as f:
        lines = [line.strip() for line in f]
    return [re.split(r"[\s<>=!~;\[]", line, maxsplit=1)[0]
            for line in lines if line and not line.startswith("#")]


def missing_distributions(names: Optional[List[str]] = None) -> List[str]:
    """Those of ``names`` (default: the driver's) that are not installed."""
    missing = []
    for name in driver_distributions() if names is None else names:
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    return missing


def missing_extra_message() -> Optional[str]:
    """The one-line error for a missing driver extra, or None when everything is installed."""
    missing = missing_distributions()
    if not missing:
        return None
    return (f"the heterospec command needs the driver's dependencies ({', '.join(missing)} "
            f"missing): {INSTALL_COMMAND}")
