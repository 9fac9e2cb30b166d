"""The evaluation fixtures (tests/helpers_eval.py): a tiny saved pipeline, SAE and CSV, a library run."""
from helpers_eval import clip_dir, pipe, sae, saved, whole  # noqa: F401  (fixtures)
