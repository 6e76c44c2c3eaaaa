"""What a job tells people: heartbeats, metrics, curves, TensorBoard, webhooks at its end."""
