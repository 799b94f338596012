"""largefr: large-scale face-recognition training with a class-partitioned, cluster-guided ArcFace head."""

__version__ = "0.1.0"
