"""MT-Bench-style evaluation as a library (questions, generation, judging, aggregation, plots);
``pipeline.stages.evaluate`` strings it together, ``pipeline.judges`` holds the judge backends."""
