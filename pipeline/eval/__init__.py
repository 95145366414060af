"""MT-Bench-style evaluation as a library; ``pipeline.stages.evaluate`` strings it together."""
