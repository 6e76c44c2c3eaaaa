"""cherry-train: a training-job queue in a (Google Drive) folder."""

__version__ = "0.1.0"
