"""Model files of other frameworks (layer 2): the mlx-lm style MLX model and the vLLM model
with its plugin registration. They import only the core (`plt_port`) and the kernels."""
