"""``neva plan``: per-GPU memory and step time of a recipe's parallel layouts, from the model's shapes.

:mod:`.shapes` reads the shapes, :mod:`.params` lists each rank's parameters, :mod:`.memory` lays them out as
megatron-core does (weights, gradients, optimizer state), :mod:`.activations` counts what backward keeps,
:mod:`.estimate` puts one layout together, :mod:`.search` ranks every layout, :mod:`.recipe` reads a config.
"""
