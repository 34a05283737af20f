"""Makes TensorFlow look uninstalled, as on an accelerator image without it: put this folder on
PYTHONPATH and Python runs this file at start-up, in the process and in every process it spawns (data
workers). `import tensorflow` raises ModuleNotFoundError and `importlib.util.find_spec("tensorflow")`
returns None, which is how libraries (etils, tensorboard) probe for it."""

import importlib.machinery
import sys


class _PathFinderWithoutTensorFlow(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.split(".")[0] == "tensorflow":
            return None
        return super().find_spec(name, path, target)


sys.meta_path[:] = [_PathFinderWithoutTensorFlow if finder is importlib.machinery.PathFinder else finder
                    for finder in sys.meta_path]
