"""Test-side alias of snce_fast.testing (tiny random-weight models and pipelines)."""
from snce_fast.testing import *  # noqa: F401,F403
from snce_fast.testing import bert_model, random_sae, sd_pipeline, sdxl_pipeline, write_bert_tokenizer, write_clip_tokenizer  # noqa: F401
