"""Inference service: the FastAPI gateway (service.app), its workers (in process or Triton), the Python
client (service.client) and the batch extractor (service.extract)."""
