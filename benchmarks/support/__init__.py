"""The parts of benchmarks/proxy.py: the synthetic SSE upstream, the load generator, the machine's processes and
CPU accounting (nginx included), and the report. Importable once the checkout's root is on sys.path."""
