"""The laptop side: submit, status, init. Runs without torch."""
