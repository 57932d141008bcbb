"""Model building blocks. Each layer calls lepton_kernels ops and nothing else for its math."""
