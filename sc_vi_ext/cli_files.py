"""The files of the command line: paths checked before anything runs, outputs written atomically.

An output is written to a temporary file beside it (same folder, so the same file system)
and renamed over it only once complete: a failed write (a full disk, a file-size limit, a
signal) leaves the old file, or the input when OUT is IN, as it was. zarr stores (folders
ending in ``.zarr``) are read and written like h5ad files.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


class CommandError(Exception):
    """A problem the user can fix: ``sc-vi-ext`` prints it on one line and exits with ``status``."""

    def __init__(self, message: str, status: int = 2):
        super().__init__(message)
        self.status = status


def _is_zarr(path: Path) -> bool:
    return path.suffix == ".zarr" or (path / ".zgroup").exists() or (path / "zarr.json").exists()


def check_input(path: str, *, backed: bool) -> str:
    """Return the input's format (``"h5ad"`` or ``"zarr"``), or raise :class:`CommandError` saying what is wrong.

    The file is opened and its structure walked (no matrix is read): a truncated h5ad, a store
    whose arrays are missing, an element without the parts its encoding needs are refused here.
    """
    import h5py

    p = Path(path)
    if not p.exists():
        raise CommandError(f"input {path} does not exist")
    if p.is_dir():
        if not _is_zarr(p):
            raise CommandError(f"input {path} is a folder, not an h5ad file (nor a zarr store)")
        if backed:
            raise CommandError(f"--backed reads h5ad files; {path} is a zarr store (leave out --backed)")
        _check_intact(path, "zarr")
        return "zarr"
    if not h5py.is_hdf5(p):
        raise CommandError(f"input {path} is not an h5ad file (not HDF5: wrong file, or damaged)")
    _check_intact(path, "h5ad")
    return "h5ad"


# the parts an element of each anndata encoding consists of (a data frame: its index and columns)
_PARTS = {"csr_matrix": ("data", "indices", "indptr"), "csc_matrix": ("data", "indices", "indptr"),
          "categorical": ("codes", "categories"), "nullable-integer": ("values", "mask"),
          "nullable-boolean": ("values", "mask"), "nullable-string-array": ("values", "mask")}


def _missing_parts(group, where: str = ""):
    """Yield the names of the parts that the encodings in ``group`` (h5py or zarr) need and that are missing."""
    enc = group.attrs.get("encoding-type")
    need = list(_PARTS.get(enc, ()))
    if enc == "dataframe":
        need += [str(group.attrs.get("_index", "_index")), *map(str, group.attrs.get("column-order", []))]
    if where == "":
        need += ["obs", "var"]
    for name in need:
        if name not in group:
            yield f"{where}/{name}"
    for name in group:
        child = group[name]
        if hasattr(child, "keys"):  # a group: its parts in turn
            yield from _missing_parts(child, f"{where}/{name}")


def _listed_but_absent(path: str) -> list[str]:
    """Arrays and groups that a zarr store's consolidated metadata lists but whose own metadata is gone."""
    import json

    p = Path(path)
    if (p / ".zmetadata").is_file():  # zarr v2: {"metadata": {"X/data/.zarray": ...}}
        listed = json.loads((p / ".zmetadata").read_text()).get("metadata", {})
        absent = {"/" + k.rpartition("/")[0] for k in listed if k.endswith((".zarray", ".zgroup"))
                  and "/" in k and not (p / k).is_file()}
    else:
        root = json.loads((p / "zarr.json").read_text()) if (p / "zarr.json").is_file() else {}
        listed = (root.get("consolidated_metadata") or {}).get("metadata", {})  # zarr v3
        absent = {"/" + k for k in listed if not (p / k / "zarr.json").is_file()}
    # a missing group is named, not each of its parts
    return sorted(a for a in absent if not any(a.startswith(b + "/") for b in absent))


def _check_intact(path: str, fmt: str) -> None:
    """Open the input and walk its structure; raise :class:`CommandError` naming what is damaged."""
    import re

    try:
        if fmt == "zarr":
            import zarr

            missing = _listed_but_absent(path) or list(_missing_parts(zarr.open_group(path, mode="r",
                                                                                      use_consolidated=False)))
        else:
            import h5py

            with h5py.File(path, "r") as f:
                missing = list(_missing_parts(f))
    except Exception as e:  # HDF5's or zarr's own words, on one line
        what = " ".join(str(e).split()) or type(e).__name__
        m = re.search(r"truncated file: eof = (\d+).*stored_eof = (\d+)", what)
        if m:
            what = f"truncated, {int(m[1]):,} of its {int(m[2]):,} bytes are there (an interrupted copy?)"
        raise CommandError(f"input {path} is damaged: {what}; copy or write it again") from None
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CommandError(f"input {path} is damaged: {shown} missing; copy or write it again")


def check_output(path: str) -> str:
    """Check that ``path`` can be written, before any work; return its format (``"h5ad"`` or ``"zarr"``)."""
    p = Path(path)
    fmt = "zarr" if p.suffix == ".zarr" else "h5ad"
    if p.is_dir() and fmt == "h5ad":
        raise CommandError(f"output {path} is a folder; name the h5ad file to write (e.g. {p / 'out.h5ad'})")
    folder = p.parent
    if not folder.is_dir():
        raise CommandError(f"the folder of output {path} does not exist; create it first (mkdir -p {folder})")
    try:  # the real test: a file can be created there (os.access says yes to root on a read-only mount)
        fd, probe = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".probe", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise CommandError(f"cannot write output {path}: {e.strerror or e} in {folder}") from None
    if p.is_file() and not os.access(p, os.W_OK):
        raise CommandError(f"output {path} exists and is read-only")
    return fmt


def read_input(path: str, fmt: str, *, backed: bool):
    """Read the AnnData at ``path`` (checked by :func:`check_input`); a read that fails is a :class:`CommandError`."""
    import anndata as ad

    try:
        if fmt == "zarr":
            return ad.read_zarr(path)
        return ad.read_h5ad(path, backed="r" if backed else None)
    except MemoryError:
        raise
    except Exception as e:  # a damaged block that the structure check cannot see
        raise CommandError(f"input {path} is damaged: could not read it ({type(e).__name__}: "
                           f"{' '.join(str(e).split())}); copy or write it again") from None


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


def _beside(p: Path, kind: str) -> Path:
    """Return a name beside ``p`` that no other run picks: process id and a random part (containers share pids)."""
    return p.with_name(f".{p.stem}.{kind}-{os.getpid()}-{secrets.token_hex(4)}{p.suffix}")


def _swap_in(tmp: Path, p: Path) -> None:
    """Move the store ``tmp`` (a folder) to ``p``; an old store there is removed only once the new one is in place.

    Another run may put its store at ``p`` between the two renames: it is moved aside in turn
    (the last run to finish wins). When the new store cannot be moved in, the old one is put back.
    """
    aside: list[Path] = []
    try:
        while True:
            old = _beside(p, "old")
            try:
                os.rename(p, old)
                aside.append(old)
            except FileNotFoundError:
                pass
            try:
                os.rename(tmp, p)
                break
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not p.exists():
                    raise
    except BaseException:
        if aside and not p.exists():
            os.rename(aside.pop(0), p)  # the old store back, whole
        for a in aside:
            _remove(a)
        raise
    for a in aside:
        _remove(a)


def write_atomic(write: Callable[[Path], object], path: str | Path) -> None:
    """Call ``write(tmp)`` on a temporary path beside ``path``, then rename it over ``path``.

    The temporary name keeps the suffix (writers choose the format by it) and is unique to the
    run, so runs writing the same ``path`` at once each write their own file and the last rename
    wins: ``path`` is always a complete result of one of them. On any failure, Ctrl-C included,
    the temporary file is removed and ``path`` is left as it was; the error propagates. A zarr
    store (a folder) replaces the old one by two renames (:func:`_swap_in`), the old store
    removed only after the new one is in place, and put back if the new one cannot be.
    """
    p = Path(path)
    tmp = _beside(p, "tmp")
    try:
        write(tmp)
        if tmp.is_dir():
            _swap_in(tmp, p)
        else:
            os.replace(tmp, p)
    except BaseException:
        _remove(tmp)
        raise


def write_adata(adata, path: str | Path, fmt: str) -> None:
    """Write ``adata`` as h5ad or zarr, atomically (:func:`write_atomic`); a failure becomes a :class:`CommandError`."""
    try:
        write_atomic(adata.write_zarr if fmt == "zarr" else adata.write_h5ad, path)
    except Exception as e:  # a full disk, a file-size limit, an HDF5 error: one line, the old file kept
        raise CommandError(f"could not write {path} ({type(e).__name__}: {e}); {path} was left as it was",
                           status=1) from e
