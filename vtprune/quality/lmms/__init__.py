"""The vtprune model as an lmms-eval plugin package: `models` holds the model class (and the
AVAILABLE_MODELS table that LMMS_EVAL_PLUGINS=vtprune.quality.lmms reads), `tasks` the task
folder that the same variable adds to lmms-eval's search path (empty: local tasks are passed
with --include_path). See vtprune/quality/lmms_eval_plugin.py."""
