"""Code generation: render Triton source from the templates in ``kernels/`` and load it from the cache."""
