"""Flax Linen model zoo, the traced graph and pruning state for any model.

* ``create_model(name, num_classes, groups=None, **overrides)`` builds a
  registered model (wrapped by ``prunable``); ``list_models()`` lists them;
  ``registry.register`` adds one.
* ``analyze(model, image_size, channels)``: the traced graph (``Graph``) of
  any Linen model, the one description every method and exporter reads.
* ``prunable(model)``: any Linen model with the ``masks``, ``gates``,
  ``ddrop`` collections honoured, without changing the model.

Every model takes NHWC images; ``train`` is passed to models whose
``__call__`` takes it.
"""

from models import flops, graph, paths
from models.graph import (Block, Graph, LayerInfo, analyze, dead_channels,
                          zero_dead)
from models.pruning import (COLLECTIONS, DDROP, DDROP_STATS, GATES, MASKS,
                             Prunable, apply_masks, full_masks, prunable,
                             unwrap)
from models.registry import (GENERIC, MODEL_SPECS, ModelSpec, create_model,
                             list_models, model_spec, register)

__all__ = [
    "Block", "COLLECTIONS", "DDROP", "DDROP_STATS", "GATES", "GENERIC",
    "Graph",
    "LayerInfo", "MASKS", "MODEL_SPECS", "ModelSpec", "Prunable", "analyze",
    "apply_masks", "create_model", "dead_channels", "flops", "full_masks",
    "graph", "list_models", "model_spec", "paths", "prunable", "register",
    "unwrap", "zero_dead",
]
