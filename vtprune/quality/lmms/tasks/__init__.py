"""Task folder of the LMMS_EVAL_PLUGINS layout (lmms-eval 0.7 requires `PLUGIN.tasks` to exist)."""
