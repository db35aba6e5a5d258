from llava_gguf.cli import main

main()
