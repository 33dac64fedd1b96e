"""torch implementations that define what each op computes. They run anywhere, in float32 (or float64
where a test asks for it), and every kernel is tested against them."""
