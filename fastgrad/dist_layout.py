"""Where gradients live across ranks: meshes, pipeline stages and the groups fastgrad reduces over.

One call may hold DTensors on several meshes (sub-meshes of one root mesh,
flattened meshes, several roots), plain tensors, and a ``process_group``.
This module reads the meshes (host-only, cached per mesh) and answers three
questions for :mod:`fastgrad.distributed`:

* **Stage** ``S``: the ranks that hold the same list of tensors (pieces of
  them) and combine per-tensor rows. It is the root mesh without its pipeline
  dimensions: every rank with this rank's pipeline coordinates.
* **Domain** ``D``: every rank of the model. ``D == S`` without pipeline
  parallelism; with it, ``D`` spans all stages and carries only the totals.
* **Count once**: whether this rank's piece of a tensor counts. A DTensor on
  a sub-mesh of its root is implicitly replicated over the root's other
  (non-pipeline) dimensions: only the rank at coordinate 0 of each of them
  counts, as for a ``Replicate()`` placement.

A mesh dimension is a pipeline dimension when its name is in
:data:`PIPELINE_DIM_NAMES` (``{"pp"}``, torchtitan's name): ranks that differ
only in that coordinate hold different layers. Nothing else is detected.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass

import torch

#: Mesh dimension names that mean "pipeline stages" (edit the set to add your own name).
PIPELINE_DIM_NAMES: set[str] = {"pp"}
#: ``FASTGRAD_CHECK_LAYOUT``: ``first`` (default; the first call per group and kind),
#: ``always`` (every call: one more fixed-size all-reduce and a host read), or ``off``.
CHECK_ENV = "FASTGRAD_CHECK_LAYOUT"


class LayoutError(RuntimeError):
    """The ranks of a group disagree on what they hold (raised identically on every rank)."""


@dataclass(frozen=True)
class RankSet:
    """A set of ranks and how to reach the process group spanning exactly them (made lazily)."""

    ranks: tuple[int, ...]
    _make: object  # () -> ProcessGroup | None
    origin: tuple = ()  # what the set came from (root mesh shape and names, or "group"): the check's key

    def group(self):
        return _group_cache_get(self)


_groups: dict = {}


def _group_cache_get(rs: RankSet):
    # keyed by the default group too: a re-initialised torch.distributed makes new groups
    key = (rs.ranks, rs.origin, id(torch.distributed.group.WORLD))
    g = _groups.get(key)
    if g is None:
        g = _groups[key] = rs._make()
    return g


@dataclass(frozen=True)
class MeshInfo:
    """This rank's view of one mesh inside its root (see the module docstring)."""

    stage: RankSet
    domain: RankSet
    coordinate: tuple[int, ...]  # this rank's coordinate in the mesh itself
    replicated_elsewhere_zero: bool  # coordinate 0 on every root dim the mesh does not span (non-pipeline)


def _sub_group(root, keep: list[int]):
    """A group spanning the root mesh's dims ``keep`` at this rank's other coordinates."""
    dist = torch.distributed
    if not keep:
        return None
    if len(keep) == root.ndim and root.size() == dist.get_world_size():
        return dist.group.WORLD
    if len(keep) == 1:
        return root.get_group(keep[0])
    names = root.mesh_dim_names
    if names:
        return root[tuple(names[d] for d in keep)]._flatten("_fastgrad_" + "_".join(names[d] for d in keep)).get_group()
    # Unnamed mesh: every rank of the world creates every instance, in the same order.
    if root.size() != dist.get_world_size():
        raise ValueError("fastgrad: name the dimensions of a DeviceMesh smaller than the world (mesh_dim_names=)")
    other = [d for d in range(root.ndim) if d not in keep]
    t = root.mesh.permute(*other, *keep).reshape(-1, math.prod(root.mesh.shape[d] for d in keep))
    me = dist.get_rank()
    mine = None
    for row in t.tolist():
        g = dist.new_group(row)
        if me in row:
            mine = g
    return mine


_info_cache: dict = {}


def mesh_info(mesh, as_root: bool = False) -> MeshInfo:
    """:class:`MeshInfo` of ``mesh`` within its root (``as_root``: ``mesh`` itself is the root,
    for a ``process_group=`` mesh). Cached per mesh object."""
    key = (id(mesh), as_root)
    hit = _info_cache.get(key)
    if hit is not None and hit[0] is mesh:
        return hit[1]
    info = _mesh_info(mesh, as_root)
    if len(_info_cache) > 256:
        _info_cache.clear()
    _info_cache[key] = (mesh, info)
    return info


def _mesh_info(mesh, as_root: bool) -> MeshInfo:
    dist = torch.distributed
    root = mesh if as_root else mesh._get_root_mesh()
    coord = mesh.get_coordinate()
    if coord is None:
        raise RuntimeError("fastgrad: this rank is not in the DeviceMesh of a gradient")
    R = root.mesh
    me = dist.get_rank()
    hit = (R == me).nonzero()
    if hit.numel() == 0:
        raise RuntimeError("fastgrad: this rank is not in the root DeviceMesh of a gradient")
    rc = hit[0].tolist()
    names = root.mesh_dim_names or ()
    pp = [d for d in range(R.ndim) if names and names[d] in PIPELINE_DIM_NAMES]
    members = set(mesh.mesh.flatten().tolist())
    zero = True
    for d in range(R.ndim):
        if d in pp or R.shape[d] == 1:
            continue
        nxt = list(rc)
        nxt[d] = (rc[d] + 1) % R.shape[d]
        if int(R[tuple(nxt)]) not in members:  # the mesh does not span dim d: a replica along it
            zero = zero and rc[d] == 0
    keep = [d for d in range(R.ndim) if d not in pp]
    idx = tuple(rc[d] if d in pp else slice(None) for d in range(R.ndim))
    stage = tuple(sorted(R[idx].flatten().tolist()))
    domain = tuple(sorted(R.flatten().tolist()))
    origin = ("mesh", tuple(R.shape), tuple(names))
    stage_rs = RankSet(stage, lambda: _sub_group(root, keep), origin)
    domain_rs = RankSet(domain, lambda: _sub_group(root, list(range(R.ndim))), origin)
    return MeshInfo(stage_rs, domain_rs, tuple(coord), zero)


def group_rank_set(group) -> RankSet:
    """:class:`RankSet` of a ``ProcessGroup`` (its global ranks)."""
    ranks = tuple(sorted(torch.distributed.get_process_group_ranks(group)))
    return RankSet(ranks, lambda: group, ("group",))


# -- validation ------------------------------------------------------------------------------

_checked: set = set()


def check_mode() -> str:
    mode = os.environ.get(CHECK_ENV, "first").strip().lower() or "first"
    if mode not in ("first", "always", "off"):
        raise ValueError(f"{CHECK_ENV}={mode!r}: choose first, always or off")
    return mode


def signature(rows: list[tuple]) -> int:
    """A 62-bit fingerprint of the row descriptions (the same on every process: no ``hash()``)."""
    h = hashlib.blake2b(repr(rows).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 2


def check_layout(stage: RankSet, kind: str, rows_fn, device: torch.device) -> None:
    """Raise :class:`LayoutError` on every rank of ``stage`` unless all hold the same rows.

    One all-reduce (MAX) of 4 int64 (``[sig, -sig, T, -T]``) and one host read, on the first
    call per (group, where it came from, kind), or every call with ``FASTGRAD_CHECK_LAYOUT=always``. The error is
    built from the reduced values alone, so every rank raises the same text.
    """
    mode = check_mode()
    if mode == "off" or len(stage.ranks) < 2:
        return
    key = (stage.ranks, stage.origin, kind)
    if mode == "first" and key in _checked:
        return
    rows = rows_fn()
    sig = signature(rows)
    buf = torch.tensor([sig, -sig, len(rows), -len(rows)], dtype=torch.int64).to(device)
    torch.distributed.all_reduce(buf, op=torch.distributed.ReduceOp.MAX, group=stage.group())
    hi_sig, lo_sig, hi_t, lo_t = buf.tolist()
    lo_sig, lo_t = -lo_sig, -lo_t
    if hi_sig == lo_sig and hi_t == lo_t:
        _checked.add(key)
        return
    shown = ", ".join(map(str, stage.ranks[:8])) + (", ..." if len(stage.ranks) > 8 else "")
    what = (f"between {lo_t} and {hi_t} gradients" if hi_t != lo_t
            else f"{hi_t} gradients each, with different names, shapes, dtypes or placements")
    raise LayoutError(
        f"fastgrad: the {len(stage.ranks)} ranks that combine per-tensor statistics here (ranks {shown}) "
        f"hold different gradient lists ({what}); every rank of a group must pass the same tensors in "
        "the same order. If these ranks are pipeline stages, build one DeviceMesh whose pipeline "
        f"dimension is named {sorted(PIPELINE_DIM_NAMES)[0]!r} (e.g. init_device_mesh(device, (pp, dp, tp), "
        "mesh_dim_names=('pp', 'dp_shard', 'tp'))), shard each stage on sub-meshes of it, or pass that "
        "mesh as process_group= for plain tensors. (Checked once per group; "
        f"{CHECK_ENV}=always|first|off.)"
    )
