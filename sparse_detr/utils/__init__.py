"""What the tools run, beyond training: FLOP and parameter accounting, the throughput and op benchmarks, the demo's
pictures (saliency drawing); and `rng`, the seeding that makes a resumed training run draw what the uninterrupted
one drew."""
