"""`llava-gguf serve`: an OpenAI-compatible chat-completions server and a web page for one LLaVA model.
``protocol.py`` is the wire format, ``images.py`` how request images are fetched, ``service.py`` the
logic, ``app.py`` the routes; ``page.html`` the page."""
