"""The benchmark suite: `python -m bench` (harness), `python bench/roofline.py` (plots), and
`pytest bench/ --benchmark-only` (the same cases through pytest-benchmark)."""
