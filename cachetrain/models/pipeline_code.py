"""The code a hub-style pipeline folder carries: found and checked before anything runs, run only when
the user trusts the folder, and put back when such a pipeline is saved.

A hub-style folder holds, beside its weights, the Python that defines its classes:

    pipeline.py                  the pipeline class; model_index.json's ``_class_name`` is "Class"
                                 (found by diffusers with custom_pipeline=folder) or ["pipeline", "Class"]
    <component>/<module>.py      a component's class; model_index.json names it [module, "Class"]

diffusers 0.42 looks for a component's module only in that component's folder (a class defined in the
root pipeline.py and named ["pipeline", "Class"] needs ``<component>/pipeline.py`` as well), and its
save_pretrained writes none of these files back. Reading a folder's code here never executes it: the
files are parsed, so a missing file, a syntax error or a missing class is named before any work.
"""

from __future__ import annotations

import ast
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..atomic import write_atomically

MODEL_INDEX_FILE = "model_index.json"
PIPELINE_CODE_FILE = "pipeline.py"
# libraries whose classes diffusers imports by itself, and ours (imported by every loader here)
_IMPORTABLE_LIBRARIES = ("diffusers", "transformers", "onnxruntime.training")
_OUR_PACKAGE = "cachetrain"


class FolderCodeError(ValueError):
    """A folder's own code cannot be loaded (missing, broken, or not defining its class), or was not trusted."""


@dataclass(frozen=True)
class CodeEntry:
    """One class a folder's own code defines: for ``entry`` ("_class_name" or a component's name)."""

    entry: str
    path: Path
    class_name: str


@dataclass(frozen=True)
class FolderCode:
    folder: Path
    index: dict
    pipeline: CodeEntry | None  # None: the pipeline class is diffusers' or ours
    components: tuple[CodeEntry, ...]

    @property
    def entries(self) -> tuple[CodeEntry, ...]:
        return ((self.pipeline,) if self.pipeline else ()) + self.components

    @property
    def carries_code(self) -> bool:
        return bool(self.entries)

    def component(self, name: str) -> CodeEntry | None:
        return next((entry for entry in self.components if entry.entry == name), None)


def _top_level_names(path: Path) -> set[str]:
    """Names a module file binds at its top level (classes, imports, assignments), without running it."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except SyntaxError as error:
        raise FolderCodeError(f"{path}: line {error.lineno}: {error.msg}; the folder's code cannot be loaded") from None
    except (OSError, UnicodeDecodeError) as error:
        raise FolderCodeError(f"{path}: cannot be read ({error})") from None
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, ast.Assign):
            names.update(target.id for target in node.targets if isinstance(target, ast.Name))
    return names


def _defined_in(path: Path, class_name: str, entry: str, index_path: Path) -> CodeEntry:
    if not path.is_file():
        raise FolderCodeError(f"{path}: no such file, but {index_path} names {class_name} from it for {entry}")
    if class_name not in _top_level_names(path):
        raise FolderCodeError(f"{path} defines no class {class_name}, which {index_path} names for {entry}")
    return CodeEntry(entry, path, class_name)


def _library_is_importable(library: str) -> bool:
    from diffusers import pipelines

    return (library in _IMPORTABLE_LIBRARIES or library == _OUR_PACKAGE or library.startswith(_OUR_PACKAGE + ".")
            or hasattr(pipelines, library))


def read_folder_code(folder: os.PathLike | str) -> FolderCode:
    """Which classes of a local pipeline folder its own code defines; FolderCodeError naming the file if
    model_index.json needs code the folder does not carry (or carries broken). Nothing is executed.

    cachetrain's own pipeline classes are named on diffusers by importing cachetrain.t5 (every loader
    here does so first), so a plain-string ``_class_name`` of ours needs no pipeline.py.
    """
    import diffusers

    folder = Path(folder)
    index_path = folder / MODEL_INDEX_FILE
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise FolderCodeError(f"{index_path}: cannot be read as a pipeline index ({error})") from None
    class_name = index.get("_class_name")
    pipeline = None
    if isinstance(class_name, (list, tuple)) and len(class_name) == 2:
        pipeline = _defined_in(folder / f"{class_name[0]}.py", class_name[1], "_class_name", index_path)
    elif isinstance(class_name, str) and (folder / PIPELINE_CODE_FILE).is_file() and \
            class_name in _top_level_names(folder / PIPELINE_CODE_FILE):
        pipeline = CodeEntry("_class_name", folder / PIPELINE_CODE_FILE, class_name)
    elif isinstance(class_name, str) and not hasattr(diffusers, class_name):
        _defined_in(folder / PIPELINE_CODE_FILE, class_name, "_class_name", index_path)  # raises: names the file
    components = []
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, (list, tuple)) or len(value) != 2 or value[0] is None:
            continue
        library, component_class = value
        if not _library_is_importable(library):
            components.append(_defined_in(folder / name / f"{library}.py", component_class, name, index_path))
    return FolderCode(folder, index, pipeline, tuple(components))


def require_trust(code: FolderCode, trusted: bool, flag: str) -> None:
    """FolderCodeError naming the files and the flag to add, if the folder carries code not trusted."""
    if code.carries_code and not trusted:
        files = ", ".join(sorted({str(entry.path.relative_to(code.folder)) for entry in code.entries}))
        raise FolderCodeError(f"{code.entries[0].path}: {code.folder} carries its own code ({files}); add {flag} "
                              "to run it (only for a folder you trust)")


def load_class(entry: CodeEntry) -> type:
    """Import the class ``entry`` names from the folder's file (diffusers' dynamic modules)."""
    from diffusers.utils.dynamic_modules_utils import get_class_from_dynamic_module

    try:
        return get_class_from_dynamic_module(str(entry.path.parent), module_file=entry.path.name,
                                             class_name=entry.class_name, trust_remote_code=True)
    except Exception as error:  # the folder's code failed as it ran: an import it needs, an error of its own
        raise FolderCodeError(f"{entry.path}: failed while loading {entry.class_name} "
                              f"({type(error).__name__}: {error})") from None


def load_pipeline_with_its_code(code: FolderCode, **kwargs):
    """The folder's pipeline through its own classes (already trusted), as plain diffusers loads it with
    ``from_pretrained(folder, custom_pipeline=folder, trust_remote_code=True)``.

    The pipeline class is imported here from the file found (a plain-string ``_class_name`` is found
    by diffusers only with custom_pipeline); diffusers loads the components' classes from their folders
    itself (it refuses one of them passed in). ``kwargs`` go to from_pretrained (a UNet, torch_dtype).
    """
    from diffusers import DiffusionPipeline

    pipeline_class = load_class(code.pipeline) if code.pipeline else DiffusionPipeline
    try:
        return pipeline_class.from_pretrained(code.folder, trust_remote_code=True, **kwargs)
    except (ImportError, SyntaxError, NameError, AttributeError, TypeError) as error:  # the folder's code, as it ran
        files = ", ".join(str(entry.path) for entry in code.entries)
        raise FolderCodeError(f"{files}: failed while loading the pipeline ({type(error).__name__}: {error})") from None


def put_code_back(source: os.PathLike | str, saved: os.PathLike | str) -> bool:
    """Give a folder saved from ``source``'s pipeline the code files ``source`` carries and the index
    entries that name them (``_class_name`` as the source had it): what diffusers' save drops.

    Files are written by rename, never in place (a saved folder's files may be hard links shared with
    checkpoints). Idempotent. False when ``source`` is not a local pipeline folder carrying code.
    """
    if not os.path.isfile(os.path.join(source, MODEL_INDEX_FILE)):
        return False  # a hub id: nothing to copy from
    code = read_folder_code(source)
    if not code.carries_code:
        return False
    saved = Path(saved)
    for path in sorted({entry.path for entry in code.entries}):
        target = saved / path.relative_to(code.folder)
        text = path.read_bytes()
        if not target.is_file() or target.read_bytes() != text:
            target.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(target, text)
    index_path = saved / MODEL_INDEX_FILE
    index = json.loads(index_path.read_text(encoding="utf-8"))
    restored = {**index, **{entry.entry: code.index[entry.entry] for entry in code.entries}}
    if restored != index:
        write_atomically(index_path, json.dumps(restored, indent=2, sort_keys=True) + "\n")
    return True
