"""Every exportable method's roles, registered by importing its module: the registry export reads."""

from __future__ import annotations

from edgeinspect.export import adabldm, diad, dualanodiff, glad
from edgeinspect.export.roles import REGISTRY, ExportContext, RoleExport

EXPORTABLE_METHODS = tuple(m.METHOD for m in (diad, glad, adabldm, dualanodiff))


def method_roles(method: str) -> list[str]:
    if method not in REGISTRY:
        raise KeyError(f"no export roles registered for method {method!r} (known: {sorted(REGISTRY)})")
    return list(REGISTRY[method])


def build_role_exports(method: str, ctx: ExportContext, roles: list[str] | None = None) -> dict[str, RoleExport]:
    known = method_roles(method)
    unknown = [r for r in roles or [] if r not in known]
    if unknown:
        raise KeyError(f"method {method!r} has no export role(s) {unknown} (it has {known})")
    out = {}
    for role in roles or known:
        spec = REGISTRY[method][role](ctx)
        if spec is None:
            if roles:
                raise KeyError(f"export role {role!r} does not apply to this {method!r} model")
            continue
        if spec.role != role:
            raise ValueError(f"builder for {role!r} returned a RoleExport for {spec.role!r}")
        out[role] = spec
    return out
