"""Layer 4: the method itself: noise distributions, analysis perturbations, outlier scores and selection."""
