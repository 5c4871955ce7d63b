"""rlad_ds: RL-aware knowledge distillation (RLAD, TRRD objective) for reasoning LLMs on DeepSpeed.

The TRRD loss is `rlad_ds.losses.trrd_loss`.
"""

__version__ = "0.1.0"
