"""Experiment grids over a base config (the paper's Tables 2-4): plan, run, measure, report (tools/ablate.py)."""
