"""The ``ponder`` console script: the composition root that wires the packages' subcommands together.

Only this package may import from every other one (model, training, export, service); they never import it.
"""
