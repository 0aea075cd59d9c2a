"""Triton kernel templates (Jinja) that sparsec's code generator renders; shipped as sparsec.kernels."""
