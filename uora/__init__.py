"""UORA: Uniform Orthogonal Reinitialization Adaptation, as a PEFT method (not built yet)."""
