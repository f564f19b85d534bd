"""What the tools run, beyond training: FLOP and parameter accounting, the throughput and op benchmarks, the demo's
pictures (saliency drawing). Not needed to train or run the model."""
