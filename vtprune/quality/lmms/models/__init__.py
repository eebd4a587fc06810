"""LMMS_EVAL_PLUGINS=vtprune.quality.lmms: lmms-eval imports PLUGIN.models.NAME.CLASS for each
entry of this table."""

AVAILABLE_MODELS = {"vtprune": "VtpruneLMM"}
