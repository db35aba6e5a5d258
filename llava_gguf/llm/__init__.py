"""The language model on llama.cpp: the runtime that decodes tokens and embedding rows (``llama``),
CPU weight repacking (``repack``), the persistent prompt cache (``prompt_cache``), parallel
sequences for batches (``parallel``), and the prompt side: tokenizer, chat templates, token
sequences, sampling."""
