"""The phasetune demo: all-MiniLM-L6-v2 fine-tuned phase by phase on Rotten Tomatoes review snippets."""
