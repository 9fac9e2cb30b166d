"""The SNCE workflow over prompt corpora: read corpora (`corpus`), stream them into latent histograms
(`scan`, `scan_stats`), rank latents (`score`), calibrate thresholds (`calibrate`), classify prompts (`detect`),
and write the latent report (`latent_report`)."""
