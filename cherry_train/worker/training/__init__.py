"""Training one job: setup, steps, validation, when to checkpoint, compiling, export."""
