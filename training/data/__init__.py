"""Data: class lists, on-disk readers (Pointcept scenes, ScanNet RGB-D export) and the synthetic generator."""
