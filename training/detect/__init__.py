"""3D object detection: data, task, metrics, config and CLI of `ponder train|evaluate detect` and `ponder detect`."""
