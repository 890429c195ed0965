"""The `tokenstream` command line: `serve`, and client commands for the terminal."""
