"""pydoctor's view of the package's facades, for ``make docs``.

Users import ``Client`` from ``twisted_rpc`` (and ``HealthState`` from
``twisted_rpc.ops``), while the code lives in private modules
(``twisted_rpc.client._client``). pydoctor on its own documents a name where it
is defined, or in the first package that re-exports it through ``__all__``;
this moves every name of a public module's ``__all__`` to the shallowest
public module that exports it, so that ``twisted_rpc.Client`` (not
``twisted_rpc.client.Client``) is the page a user finds. Private modules stay in the
reference, hidden behind "Show Private API" as in Twisted's own.

Used as ``--system-class=pydoctor_facade.FacadeSystem`` with docs/ on the path.
"""

from __future__ import annotations

from pydoctor import model
from pydoctor.extensions import ExtRegistrar


def _is_private(full_name: str) -> bool:
    return any(part.startswith("_") and not part.startswith("__") for part in full_name.split("."))


def move_to_facades(system: model.System) -> None:
    modules = [
        ob
        for ob in system.objectsOfType(model.Module)
        if ob.all is not None and not _is_private(ob.fullName())
    ]
    for module in sorted(modules, key=lambda m: m.fullName().count(".")):
        for name in module.all or ():
            if name in module.contents:
                continue
            try:
                ob = system.find_object(module.expandName(name))
            except LookupError:
                continue
            if ob is None or isinstance(ob, model.Module) or ob.parent is None:
                continue
            home = ob.parent.fullName()
            if not _is_private(home) and home.count(".") <= module.fullName().count("."):
                continue
            old = ob.fullName()
            system.msg("facade", f"moving {old!r} into {module.fullName()!r}")
            ob.reparent(module, name)
            _redirect(system, old, ob.fullName())


def _redirect(system: model.System, old: str, new: str) -> None:
    # pydoctor follows one reparenting from an import's original name, not two.
    for mod in system.objectsOfType(model.Module):
        names = mod._localNameToFullName_map
        for local, full in names.items():
            if full == old:
                names[local] = new


def setup_pydoctor_extension(r: ExtRegistrar) -> None:
    # Before pydoctor's own post-processing (priority 200) links subclasses.
    r.register_post_processor(move_to_facades, priority=300)


class FacadeSystem(model.System):
    custom_extensions = ["pydoctor_facade"]
