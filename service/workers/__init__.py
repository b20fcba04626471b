"""Model workers behind one interface: in-process (default) or remote Triton servers."""
