"""mlxexample: A Flower / MLX app."""
