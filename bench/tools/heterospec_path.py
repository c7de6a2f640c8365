"""Shared start of the measurement scripts in this directory: import ``heterospec`` installed,
or else from this checkout's ``python/``, with the Hugging Face Hub kept offline."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def import_heterospec():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import heterospec
    except ImportError:
        sys.path.insert(0, os.path.join(ROOT, "python"))
        import heterospec
    return heterospec
