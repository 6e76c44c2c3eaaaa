"""The Colab side: the claim loop, training, checkpoints. Needs the `worker` extra (torch)."""
