"""The public model registry: ``lepton.models.register("MyForCausalLM", MyModel)`` adds a custom
architecture; the classes themselves live in lepton/model_executor/models/."""

from lepton.model_executor.models import get_model_class, register

__all__ = ["get_model_class", "register"]
