"""dbsidecar: the database-routing sidecar."""

__version__ = "0.1.0"
