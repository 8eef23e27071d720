"""Model building blocks: parallel linears, embeddings / LM head, RMSNorm, RoPE, activations.

Each layer owns its tensor-parallel split and the `weight_loader` of its parameters, so model
files are written once and run at any tensor-parallel size.
"""
