"""The interpreter `etl.download.run_img2dataset` starts: ``python -P etl/img2dataset_child.py PARENT_PID``,
with img2dataset.download's arguments as JSON on stdin.

img2dataset's logger process and pool workers are spawned, and a spawned process imports its parent's main
module before anything else; this file is that module, so what it does at the top happens in every
process of a download, while the guarded part runs in the first one only.
"""

import importlib
import sys
import types

# img2dataset imports webdataset, and webdataset imports torch for its DataLoader adapters, which
# img2dataset never uses; webdataset falls back to stand-ins when torch is missing. Hiding torch spares each
# of a download's three interpreters (this one, the logger, a worker) about 2 s of start-up, paid once per
# shard (benchmarks/download_startup.py).
sys.modules["torch"] = None


class ImportedOnUse(types.ModuleType):
    """Stands in for a module until one of its attributes is read, then imports it and hands that on.

    img2dataset imports wandb (for enable_wandb), albumentations (for resize modes other than "no", and
    blurring) and pandas (for JSON URL lists) at its top. A download asks for none of them: wandb and
    albumentations are never loaded, pandas only where pyarrow's feather writer asks whether a table is a
    DataFrame (img2dataset's first interpreter). That spares each interpreter about 2 s of imports.
    importlib.util.LazyLoader does not do here: an `import` statement reads the module's __spec__, which
    makes LazyLoader load it at once.
    """

    def __getattr__(self, name: str):
        if sys.modules.get(self.__name__) is self:
            del sys.modules[self.__name__]
        return getattr(importlib.import_module(self.__name__), name)


for _name in ("wandb", "albumentations", "pandas"):
    sys.modules[_name] = ImportedOnUse(_name)

if __name__ == "__main__":
    import json
    import os
    import signal
    import threading
    import time

    def die_with_parent(parent: int) -> None:
        # A caller killed outright (SIGKILL, the OOM killer) runs no cleanup: img2dataset would go on writing.
        while os.getppid() == parent:
            time.sleep(0.5)
        os.killpg(0, signal.SIGKILL)

    threading.Thread(target=die_with_parent, args=(int(sys.argv[1]),), daemon=True).start()
    import img2dataset

    img2dataset.download(**json.loads(sys.stdin.read()))
