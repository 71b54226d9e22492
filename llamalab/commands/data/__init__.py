"""Entry points: one module per CLI word, each holding only its Config and main()."""
