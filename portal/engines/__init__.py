"""Model servers Pilotfish runs: one module per engine (vllm.py, llama_cpp.py, whisper.py, on base.py), installing
them (installer.py, staging.py), checking that they answer (check.py), and the small servers of its own."""
