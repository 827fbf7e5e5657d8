"""tlsmitm benchmarks: each module exposes ``run(seconds) -> dict[str, float]``."""
