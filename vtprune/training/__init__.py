"""Adversarial training of the token merger and pruner heads on a frozen LLaVA (issue 6).

    vtprune train --model DIR --config cfg.yaml --data train.jsonl --out runs/NAME [--resume]

forward.py (the full and the pruned forward), discriminator.py, losses.py, schedule.py
(temperature annealing), data.py (JSONL records), checkpoint.py, trainer.py (the loop, DDP).
"""
from .data import Example, TrainingData
from .schedule import temperature_at
from .trainer import Trainer, TrainSettings, train

__all__ = ["temperature_at", "TrainingData", "Example", "Trainer", "TrainSettings", "train"]
