"""fmtl-server: the coordinator service of fmtl-edge deployments.

``fmtl-server serve --config job.toml`` runs a job's methods (the same plans as ``fmtl-edge
simulate``, through the same method runner, :mod:`fmtl_edge.runner`) over device agents that connect with
``fmtl-edge join``; it persists the job in SQLite plus safetensors checkpoints so that a killed
server resumes from its last completed round. ``fmtl-server status`` shows jobs, rounds and
devices; ``fmtl-server token`` issues device tokens. See docs/deployment.md.
"""

from fmtl_edge import __version__

__all__ = ["__version__"]
