"""Where the SAE meets a text encoder: hook points found by role (`points`), tokenising and reading the
hooked tensor (`activations`), whether an SAE is compatible with an encoder and an edit (`compat`),
and `patch` / `unpatch` / `patched`, which edit the hooked tensor inside a pipeline (`patching`)."""
