"""Adversarial training of the token merger and pruner heads (issue 6). So far: the temperature
schedule and the JSONL data reader; the trainer, discriminator, losses and `vtprune train` are
still to come."""
from .data import Example, TrainingData
from .schedule import temperature_at

__all__ = ["temperature_at", "TrainingData", "Example"]
