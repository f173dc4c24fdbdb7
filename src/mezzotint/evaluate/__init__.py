"""Evaluation: the Shapes prompt-adherence judge (`judge`) and benchmarks."""
