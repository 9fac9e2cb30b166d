"""Files the package writes and reads back: the one atomic writer (`atomic`), the JSON record formats
of the workflow (`scores`, `calibration`, read through `jsonfile`; docs/formats.md) and what a result
file records about its run (`run_info`). The bottom layer: it imports nothing else of snce_fast."""
