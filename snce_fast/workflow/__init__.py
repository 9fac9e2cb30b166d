"""The SNCE workflow over prompt corpora: read corpora (`corpus`), stream them into latent histograms
(`scan`, `scan_stats`), rank latents (`score`), calibrate thresholds and classify prompts (`detect`),
and write the latent report (`report`)."""
