"""GPTQ, AWQ and compressed-tensors checkpoints, repacked at load into lepton_kernels' quantized
layout.

    spec = read_quant_spec(hf_config)          # config.py: quantization_config, checked
    wrap, quantization = checkpoint_repacker(model, hf_config, quantization)    # loading.py

config.py reads and checks ``quantization_config``; gptq.py, awq.py and compressed_tensors.py
convert one projection's packed tensors into a QuantizedWeight (lepton_kernels/ops/quantize.py);
loading.py finds each projection's Linear through the model's weight map and fills it as the
tensors stream in. The
same quant_matmul implementations then serve these layers as they do ``quantization="int4"``.

This module imports nothing heavy, so config checks can use it; loading.py is imported by the
loader.
"""

from .config import CHECKPOINT_METHODS, QuantSpec, describe_quantization, read_quant_spec

__all__ = ["CHECKPOINT_METHODS", "QuantSpec", "describe_quantization", "read_quant_spec"]
