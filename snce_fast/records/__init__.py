"""Files the package writes and reads back: the one atomic writer (`atomic`) and the JSON record formats
of the workflow (docs/formats.md). The bottom layer: it imports nothing else of snce_fast."""
