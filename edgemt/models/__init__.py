"""Multi-task models: the registry, the baseline, and (later) teachers and students."""

from edgemt.models.registry import (
    MultiTaskModel,
    create_model,
    graph_output_stride,
    list_models,
    load_model,
    model_from_arch,
    register_model,
    save_model,
)

__all__ = [
    "MultiTaskModel",
    "create_model",
    "graph_output_stride",
    "list_models",
    "load_model",
    "model_from_arch",
    "register_model",
    "save_model",
]
