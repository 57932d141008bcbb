"""lepton: an LLM inference engine on top of lepton_kernels."""

__version__ = "0.1.0"
