"""largefr: large-scale face-recognition training with a class-partitioned, cluster-guided ArcFace head."""

__version__ = "0.1.0"

from largefr.quiet import quiet_third_party

quiet_third_party()  # before any tool imports deepspeed: its no-GPU warning says nothing the banner does not
