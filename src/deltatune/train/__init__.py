"""Training: recipes, data, the loop, checkpoints and evaluation. Sits above `methods`; methods never import it."""
