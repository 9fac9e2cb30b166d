"""tests/attack reuse the planted tiny BERT of tests/evaluation/helpers_efficacy.py."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "evaluation"))
