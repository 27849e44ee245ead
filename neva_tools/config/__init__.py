"""The training configuration: loading (``conf/neva_config.yaml`` → recipe → ``key=value``), NeMo's key table, the
suggestions for unknown keys and the architecture keys checked against the checkpoints.

Its own package (it grew out of ``neva_tools.train``): the config is read by more than training — ``neva config``,
exports of unfinished runs, the demo and the drop-in launchers — and NeMo's full ``neva_config.yaml`` layout needs a
key table of its own (``nemo_keys``), kept as data like the weight mappings.
"""
