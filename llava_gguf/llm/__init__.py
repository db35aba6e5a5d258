"""The language model on llama.cpp: the runtime that decodes tokens and embedding rows in one sequence
(``llama``), CPU weight repacking (``repack``), the persistent prompt cache (``prompt_cache``), many
answers generated together over one context of several sequences (``scheduler`` on ``shared_context``),
and the prompt side: tokenizer, chat templates, token sequences, sampling, text streams."""
