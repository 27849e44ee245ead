"""Training: optimizer and schedule, the Lightning module and strategy over megatron-core, checkpoints."""
