"""The command layer: one module per verb of ``pixart-tune``.

Each module parses its verb's arguments into a typed config, calls one library
function and prints what it did; nothing else in the package parses arguments or
prints. The modules import their library only inside ``main``, so listing the verbs
(``pixart-tune --help``) loads no model library.
"""

from __future__ import annotations

from types import ModuleType

from pixart_tune.commands import app, class_images, export, init_tiny, merge, plan, prepare, sample, train

# verb -> its module (with ``SUMMARY`` and ``main(argv) -> int``), in the order --help lists them
VERBS: dict[str, ModuleType] = {
    "init-tiny": init_tiny,
    "class-images": class_images,
    "prepare": prepare,
    "train": train,
    "plan": plan,
    "sample": sample,
    "merge": merge,
    "export": export,
    "app": app,
}
