"""text: tokenizers (SentencePiece, Meta's tiktoken format, HF tokenizer.json) and chat formats.

Imports only llama_jax.config / llama_jax.errors from the package. `load_tokenizer` is in tokenizer.py."""
