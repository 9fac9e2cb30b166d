"""The evaluation fixtures (tests/helpers_eval.py): a tiny saved pipeline, SAE and CSV, a library run; used by test_cli_eval.py."""
from helpers_eval import clip_dir, pipe, sae, saved, whole  # noqa: F401  (fixtures)
