"""The staged UORA instruction-tuning pipeline: prepare → train → evaluate → export → promote."""

__version__ = "0.1.0"
