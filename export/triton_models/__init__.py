"""Python-backend model templates of the Triton repository (`export.triton_repo` copies them into
``<model>/1/`` as ``ponder_kernel_maps.py``, ``ponder_onnx_encoder.py`` and ``ponder_torch_encoder.py``).

They run inside Triton's Python-backend stub, where ``triton_python_backend_utils`` exists; nothing in the
project imports them.
"""
