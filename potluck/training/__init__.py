"""Shared ML code: the model family, token streams, DiLoCo optimizers and evaluation."""
