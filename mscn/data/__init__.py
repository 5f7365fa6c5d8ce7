"""Dataset tools behind `mscn data ...`."""
