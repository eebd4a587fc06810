"""Adversarial training of the token merger and pruner heads: see the training issue."""
