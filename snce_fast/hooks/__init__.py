"""Where the SAE meets a text encoder: hook points found by role (`points`), tokenising and reading the
hooked tensor (`activations`), and `patch` / `unpatch` / `patched`, which edit it inside a pipeline."""
