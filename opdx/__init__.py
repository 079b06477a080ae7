"""opdx: on-policy distillation with f-divergences, stop-gradient OPD and unbiased OPD+."""

__version__ = "0.1.0"
