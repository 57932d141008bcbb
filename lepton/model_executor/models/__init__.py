"""Architecture registry: HF ``architectures[0]`` -> model class.

    lepton.models.register("MyForCausalLM", MyModel)   # add a custom architecture

A model class provides ``from_config(hf_config: dict, dtype, device)``, ``load_weights(iterable of
(hf_name, tensor)) -> set of consumed names`` (tensors arrive in the checkpoint's dtype, memory-
mapped: the model copies them into its own parameters, which casts), ``check_loaded()`` (ValueError
naming a missing tensor), and ``forward(input_ids[T], positions[T], meta)``. Decoders also provide ``compute_logits(hidden[N,H]) -> [N,V]`` and ``attention_layers()``.
Built-in classes are imported lazily, so registering one never imports the others.
"""

from __future__ import annotations

import importlib

_BUILTIN = {
    "LlamaForCausalLM": "lepton.model_executor.models.llama:LlamaForCausalLM",
    "MistralForCausalLM": "lepton.model_executor.models.llama:LlamaForCausalLM",
    "Qwen2ForCausalLM": "lepton.model_executor.models.llama:LlamaForCausalLM",
    "Qwen3ForCausalLM": "lepton.model_executor.models.llama:LlamaForCausalLM",
    "GPT2LMHeadModel": "lepton.model_executor.models.gpt2:GPT2LMHeadModel",
    "BertModel": "lepton.model_executor.models.bert:BertModel",
    "BertForSequenceClassification": "lepton.model_executor.models.bert:BertForSequenceClassification",
}
_CUSTOM: dict[str, type] = {}


def register(architecture: str, cls: type) -> None:
    """Make ``architecture`` (as in config.json's ``architectures``) load with ``cls``."""
    if not isinstance(architecture, str) or not architecture:
        raise ValueError("architecture must be a non-empty string")
    _CUSTOM[architecture] = cls


def supported_architectures() -> list[str]:
    return sorted({*_BUILTIN, *_CUSTOM})


def get_model_class(architecture: str) -> type:
    if architecture in _CUSTOM:
        return _CUSTOM[architecture]
    if architecture in _BUILTIN:
        module, _, name = _BUILTIN[architecture].partition(":")
        return getattr(importlib.import_module(module), name)
    raise ValueError(
        f"unsupported architecture {architecture!r}; supported: {', '.join(supported_architectures())}. "
        "Add your own with lepton.model_executor.models.register(name, cls).")
