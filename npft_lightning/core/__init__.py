"""Layer 1: errors, atomic io, file-system and environment checks, layers, masks, perplexity, gradients,
curvature and top-k selection. torch and the standard library only."""
