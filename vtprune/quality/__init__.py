"""Measured quality (issue 7): the SynthVQA data generator (synthvqa.py), the trainer of the small
SynthVQA LLaVA (train_base.py), answer metrics (metrics.py), the evaluation harness behind
`vtprune eval` (evaluate.py, plot.py) and the lmms-eval model plugin (lmms_eval_plugin.py)."""
