"""Experiment scripts that combine several training tasks (run with ``python -m``)."""
