"""What a job keeps to resume from: checkpoint files written whole and verified, signed kernels."""
