"""One job over several GPUs of one host: the process group, its ranks and their agreement."""
