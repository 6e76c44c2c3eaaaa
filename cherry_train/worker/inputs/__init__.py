"""A job's images on their way to the model: sources, cache, samples, loaders, GPU pipelines."""
