"""Model servers Pilotfish runs (vLLM, llama.cpp, Whisper): installing them, and the small servers of its own."""
