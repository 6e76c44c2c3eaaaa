"""Imported first by the loader processes' fork server (loaders.worker_context preloads it),
and by nothing else: the server dies with the worker that started it, even one killed with
SIGKILL; its loader processes then die with it (they set the same in their worker_init_fn).
"""

import os

from cherry_train.worker.inputs.loaders import SERVER_PARENT, end_with_parent

if os.environ.get(SERVER_PARENT):  # set only while a worker's main thread starts the server
    end_with_parent(int(os.environ[SERVER_PARENT]))
