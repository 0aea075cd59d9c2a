"""The user-facing language: sparsity specs, policy strings, the decorator and sparsify()."""
