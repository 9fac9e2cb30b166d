"""`snce-fast demo`: the whole workflow on the embedded real MiniLM encoder with its own generated,
style-matched prompt set (`prompts`), run end to end by `run.run_demo` (docs/demo.md)."""
