"""The backends: choosing one fairly, forwarding to it, and reading what it answers."""
