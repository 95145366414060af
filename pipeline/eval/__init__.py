"""MT-Bench-style evaluation, as a library: questions, answer generation, judge prompts, rating
parsing, aggregation and plots. ``pipeline.stages.evaluate`` is the recipe that strings them together;
``pipeline.judges`` holds the judge backends."""
