"""One facade per data layout, turning a catalog into lazy Datasets."""
