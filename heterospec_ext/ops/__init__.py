"""One module per op: the Python API with docstrings and the fake (meta) kernel of that op."""
