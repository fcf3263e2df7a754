"""Parts of benchmarks/export_matrix.py: the model case, the upstream flows, the runtimes that time artifacts."""
