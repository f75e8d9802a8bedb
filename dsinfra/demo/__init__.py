"""``python -m dsinfra demo``: a small DeepSeek-V3-style model trained and served
through every component (see docs/demo.md)."""
