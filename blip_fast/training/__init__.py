"""Helpers of the training entry :mod:`blip_fast.train`: options (YAML + CLI + ds_config), the LR/alpha schedules,
and checkpoints (exact resume, consolidation, export)."""
