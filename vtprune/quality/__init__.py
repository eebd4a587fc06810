"""Measured quality (issue 7): the SynthVQA data generator (synthvqa.py), answer metrics
(metrics.py), the evaluation harness behind `vtprune eval` (evaluate.py, plot.py), the lmms-eval
model plugin (lmms_eval_plugin.py, lmms/) and its task files (lmms_eval_tasks.py). The research
scripts that trained the embedded model and picked its heads live in recipes/."""
