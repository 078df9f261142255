"""``parameters.npz``: initial parameter and buffer values, written byte-for-byte reproducibly.

``numpy.savez`` stamps the current time into the zip, so two compiles of the same model
would hash differently.  The writer here fixes the timestamps and member order; the
reader checks every member against the manifest *before* reading its data, so a bundle
cannot make the device allocate more than the manifest declares, and never unpickles.
"""

from __future__ import annotations

import io
import threading
import zipfile
from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

from fedmq.bundle.manifest import Manifest
from fedmq.errors import BundleError

_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # earliest time a zip entry can carry
_HEADER_LIMIT = 65_536  # bytes: numpy's own limit for an .npy header
# numpy parses .npy headers with ast.literal_eval, and CPython 3.11's AST constructor
# keeps its recursion depth in state shared by threads: two threads parsing at once can
# fail with "SystemError: AST constructor recursion depth mismatch" (seen with several
# agents of one process loading their bundles together).  Hold this lock around every
# .npy header read that may run beside another (the agent's data loading uses it too).
NPY_HEADER_LOCK = threading.Lock()
_DTYPES: dict[str, np.dtype[np.generic]] = {
    "float32": np.dtype("<f4"),
    "int64": np.dtype("<i8"),
}


def write_parameters(arrays: Mapping[str, npt.NDArray[np.generic]]) -> bytes:
    """Serialise named arrays as an uncompressed ``.npz`` with fixed timestamps.

    Args:
        arrays: name to array, written in the mapping's order (C order, little endian).

    Returns:
        The archive bytes; identical input gives identical bytes.
    """
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            data = np.asarray(array, order="C")  # (ascontiguousarray would make 0-d 1-d)
            data = data.astype(data.dtype.newbyteorder("<"), copy=False)
            member = io.BytesIO()
            np.lib.format.write_array(member, data, version=(1, 0), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH)
            info.external_attr = 0o644 << 16  # regular file, rw-r--r--
            archive.writestr(info, member.getvalue())
    return buffer.getvalue()


def read_parameters(data: bytes, manifest: Manifest) -> dict[str, npt.NDArray[np.generic]]:
    """Read ``parameters.npz`` and check it holds exactly the manifest's tensors.

    Args:
        data: the archive bytes.
        manifest: the bundle's manifest (names, shapes and dtypes to expect).

    Returns:
        Name to read-only array, in manifest order.

    Raises:
        BundleError: not a zip/npy archive, a tensor missing or extra, or a shape,
            dtype or size that differs from the manifest.
    """
    expected = {spec.name: spec for spec in manifest.tensors}
    arrays: dict[str, npt.NDArray[np.generic]] = {}
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = archive.infolist()
            names = [m.filename.removesuffix(".npy") for m in members]
            missing = sorted(set(expected) - set(names))
            extra = sorted(set(names) - set(expected))
            if missing or extra or len(names) != len(set(names)):
                raise BundleError(
                    f"parameters.npz does not match the manifest: missing {missing[:5]}, "
                    f"unexpected {extra[:5]}"
                )
            for member, name in zip(members, names, strict=True):
                spec = expected[name]
                dtype = _DTYPES[spec.dtype]
                nbytes = spec.size * dtype.itemsize
                if member.file_size > nbytes + _HEADER_LIMIT:
                    raise BundleError(
                        f"parameters.npz member {name!r} is {member.file_size} bytes, "
                        f"more than a {list(spec.shape)} {spec.dtype} tensor needs"
                    )
                with archive.open(member) as stream:
                    version = np.lib.format.read_magic(stream)
                    with NPY_HEADER_LOCK:
                        if version == (1, 0):
                            header = np.lib.format.read_array_header_1_0(stream)
                        elif version == (2, 0):
                            header = np.lib.format.read_array_header_2_0(stream)
                        else:
                            raise BundleError(f"parameters.npz member {name!r}: npy {version}")
                    shape, fortran_order, stored_dtype = header
                    if tuple(shape) != spec.shape or stored_dtype != dtype or fortran_order:
                        raise BundleError(
                            f"parameters.npz member {name!r} is {list(shape)} {stored_dtype}"
                            f"{' (Fortran order)' if fortran_order else ''}; the manifest "
                            f"declares {list(spec.shape)} {spec.dtype}"
                        )
                    payload = stream.read(nbytes + 1)
                if len(payload) != nbytes:
                    raise BundleError(
                        f"parameters.npz member {name!r} holds {len(payload)} data bytes, "
                        f"expected {nbytes}"
                    )
                array = np.frombuffer(payload, dtype=dtype).reshape(spec.shape)
                arrays[name] = array
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise BundleError(f"parameters.npz is not a valid npz archive: {exc}") from exc
    return {spec.name: arrays[spec.name] for spec in manifest.tensors}
