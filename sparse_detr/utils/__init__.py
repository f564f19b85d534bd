"""Analysis and visualisation helpers (FLOP counting, saliency drawing); not needed to train or run the model."""
