"""Flax Linen model zoo with explicit ``masks``/``gates`` collections.

``create_model(name, num_classes, **overrides)`` builds a model by registry
name; ``list_models()`` lists the names. Every model takes NHWC images and is
called as ``model.apply(variables, x, train=...)``.
"""

from models.registry import (MODEL_SPECS, ModelSpec, create_model,
                             list_models, model_spec)
from models import flops, structure
from models.structure import (Block, LayerInfo, ModelStructure, analyze,
                              dead_channels, zero_dead)

__all__ = ["MODEL_SPECS", "Block", "LayerInfo", "ModelSpec", "ModelStructure",
           "analyze", "create_model", "dead_channels", "list_models",
           "flops", "model_spec", "structure", "zero_dead"]
