"""What a job keeps to resume from: its training state, checkpoint files, signed kernels."""
